"""Conformance tests: wherever torch.optim works, GERNE works, with the same semantics.

A package, so that its modules (``conformance.test_lion``, ...) cannot collide with test modules
of the same base name elsewhere in tests/.
"""
