"""Evaluation: pure metrics (``metrics``) and the zero-shot runner (``zero_shot``)."""
