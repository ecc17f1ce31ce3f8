"""What lockstep does with engines, as functions: ``capture.capture`` records one engine on a
prompt; ``diff.diff`` records a reference and a candidate on the same tokens and compares them
(``diff.replay_diff``: the dual test around a divergence). The engines themselves, and the
kinds of spec, are in ``lockstep.engines``."""
