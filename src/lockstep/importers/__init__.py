"""Other tools' dumps read into lockstep dumps, so that lockstep's pairing, comparison and
diagnoses work on them (``lockstep import``)."""
