"""Preprocessing (issue 4): fingerprint, plan, per-case reorient / crop / normalise / resample, and the
exact inverse back onto the original scan.

Modules, one job each: :mod:`.fingerprint`, :mod:`.plan`, :mod:`.orient`, :mod:`.crop`, :mod:`.normalize`,
:mod:`.resample`, :mod:`.transform` (``preprocess_case`` / ``invert_case``), :mod:`.stage`
(``run_preprocess``). Import from the modules; this package imports nothing on its own.
"""
