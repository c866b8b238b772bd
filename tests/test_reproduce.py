"""``python -m gerne_kernels reproduce --quick`` end to end (what CI runs to prove the command
works), the selection rule, the tables and the argument checks."""
import json

import pytest

from gerne_kernels import reproduce
from gerne_kernels.__main__ import main as cli


class CountingBar:
    """Stands in for tqdm: counts the steps reported."""

    instances = []

    def __init__(self, total, **kw):
        self.total, self.n = total, 0
        CountingBar.instances.append(self)

    def update(self, n):
        self.n += n

    def set_description(self, text):
        pass

    def close(self):
        pass


def test_quick_protocol_end_to_end(tmp_path, capsys, monkeypatch):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", CountingBar)
    out = tmp_path / "out"
    assert cli(["reproduce", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for method in reproduce.METHODS.values():
        assert method.label in text
    assert "(52.09)" in text and "(84.47)" in text and "(83.98)" in text  # the paper at 1 %
    assert "Selection" in text and "Time per method" in text
    bar = CountingBar.instances[-1]
    assert bar.n == bar.total == reproduce.Protocol(
        ratios=(0.01,), seeds=1, steps=500, grid_size=2).total_steps()
    assert (out / "reproduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| GERNE (known attr.) |" in (out / "reproduce.txt").read_text()
    result = json.loads((out / "reproduce.json").read_text())
    methods = result["ratios"]["0.01"]["methods"]
    assert list(methods) == list(reproduce.METHODS)
    for m in methods.values():
        assert len(m["grid"]) == 2 and len(m["runs"]) == 1
        best = max(m["grid"], key=lambda g: g["val_gba"])
        assert m["chosen"] == best["config"]               # chosen on validation GBA only
        assert m["runs"][0] == best                         # seed 0's run of the choice
        assert 0 <= m["test_wga"]["mean"] <= m["test_gba"]["mean"] <= 1
    # a check that can fail: on real digits GERNE with known attributes beats ERM by far
    assert methods["gerne_known"]["test_gba"]["mean"] > methods["erm"]["test_gba"]["mean"] + 0.2
    unknown = methods["gerne_unknown"]["runs"][0]["hyperparameters"]
    assert unknown["c"] == 0.5 and unknown["beta"] > 1


def fake_result():
    def method(label, gba, wga):
        grid = [{"config": {"eta": 0.1}, "val_gba": 0.5}, {"config": {"eta": 0.01}, "val_gba": 0.6}]
        return {"label": label, "grid": grid, "chosen": {"eta": 0.01}, "chosen_described": "x",
                "test_gba": {"mean": gba, "std": 0.0123}, "test_wga": {"mean": wga, "std": 0.0},
                "seconds": 2.0}

    return {"protocol": {"seeds": 3, "steps": 10, "batch_size": 4,
                         "methods": ["erm", "groupdro"]},
            "ratios": {"0.005": {"ratio": 0.005, "empty_groups": 2,
                                 "methods": {"erm": method("ERM", 0.3512, 0.0),
                                             "groupdro": method("GroupDRO", 0.8, 0.5)}}},
            "seconds_per_method": {"erm": 2.0, "groupdro": 2.0}, "seconds": 4.0, "threads": 1,
            "jobs": 2, "torch": "x", "backends_available": ["reference"]}


def test_tables_show_ours_beside_the_paper():
    r = fake_result()
    text = reproduce.format_table(r)
    assert "35.12 ± 1.23" in text and "(35.19)" in text and "(63.12)" in text
    assert "*eta=0.01: 60.0" in text and "2 empty training groups" in text
    md = reproduce.format_markdown(r)
    assert md.splitlines()[0] == "| method | GBA 0.5% | WGA 0.5% |"
    assert "| ERM | 35.12 ± 1.23 (35.19) | 0.00 ± 0.00 |" in md


def test_total_steps_counts_every_run():
    p = reproduce.Protocol(ratios=(0.01, 0.02), seeds=3, steps=100, grid_size=4,
                           methods=("erm", "jtt", "gerne_unknown"))
    # erm: 4 + 2 runs; jtt: 6 runs + 3 first stages of min(500, 100) steps;
    # gerne_unknown: 6 runs + 3 biased models of 100 steps
    assert p.total_steps() == 2 * (6 * 100 + 6 * 100 + 3 * 100 + 6 * 100 + 3 * 100)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "erm,lff"], "unknown method"),
    (["--ratios", "0.01,x"], "comma-separated"),
    (["--ratios", "0.7"], r"\(0, 0.5\]"),
    (["--grid-size", "5"], "grid-size"),
])
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        reproduce.protocol_from_args(reproduce.build_parser().parse_args(argv))
