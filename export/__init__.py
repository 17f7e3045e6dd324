"""edgeloop export."""

# The largest accuracy drop (percentage points of test accuracy against FP32 ONNX) a
# variant may show and still ship: the one default of ``edgeloop export --max-drop``, the
# pipeline and the accuracy gate (export/gate.py).  Here, not in gate.py, so that the CLI
# can show it without importing ONNX Runtime.
DEFAULT_MAX_DROP_PP = 0.5
