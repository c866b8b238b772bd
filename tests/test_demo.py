"""A tiny run of the demo: the table, the JSON and the PNG; argument checks."""
import json

import pytest

from gerne_kernels import demo


def test_tiny_demo_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = demo.main(["--steps", "15", "--seeds", "1", "--biased-steps", "6", "--sweep", "2",
                    "--image-size", "7", "--out", str(out), "--json", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("ERM", "Group resampling (c=1, beta=0)", "GERNE known attr. (c=0.5, beta=1)",
                  "GERNE unknown attr. (t=0.02"):
        assert label in text
    assert "GBA" in text and "WGA" in text and "beta bounds" in text and "GERNE backend" in text
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "demo.json").read_text())
    assert list(result["methods"]) == ["erm", "resampling", "gerne_known", "gerne_unknown"]
    for m in result["methods"].values():
        assert len(m["runs"]) == 1 and 0.0 <= m["gba"]["mean"] <= 1.0
        assert m["wga"]["mean"] <= m["gba"]["mean"] and m["gba"]["std"] == 0.0
    assert result["methods"]["gerne_known"]["runs"][0]["beta"] == 1.0
    unknown = result["methods"]["gerne_unknown"]["runs"][0]
    assert unknown["beta"] == pytest.approx(0.75 * unknown["beta_max"])
    hi = result["beta_bounds_known"]["high"]
    assert hi == pytest.approx(0.99 / (0.5 * 0.89) - 1)  # Eq. 9 at 1 % minority, c = 0.5
    assert [s["beta"] for s in result["sweep"]] == pytest.approx([-1.0, 0.95 * hi])


def test_beta_outside_bounds_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="outside"):
        demo.main(["--beta", "1.5", "--steps", "1", "--seeds", "1", "--methods", "erm",
                   "--sweep", "0", "--image-size", "7", "--out", str(tmp_path), "--no-progress"])


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        demo.main(["--methods", "erm,dro", "--out", str(tmp_path), "--no-progress"])


def test_format_table_mean_and_std():
    result = {
        "config": {"minority": 0.01, "seeds": 3, "steps": 10},
        "beta_bounds_known": {"low": -1.02, "high": 1.2247, "source": "Eq. 9"},
        "methods": {"erm": {"label": "ERM", "gba": {"mean": 0.4123, "std": 0.0101},
                            "wga": {"mean": 0.0, "std": 0.0}}},
    }
    table = demo.format_table(result)
    assert "41.23 ± 1.01" in table and "0.00 ± 0.00" in table
    assert "minority 1%" in table and "3 seed(s)" in table


def test_total_steps_counts_every_run():
    args = demo.build_parser().parse_args(["--steps", "10", "--seeds", "2", "--sweep", "3",
                                           "--biased-steps", "4"])
    assert demo.total_steps(args) == 4 * 2 * 10 + 3 * 10 + 2 * 4
