"""Models-from-code entry of the registered model: MLflow executes this file when it loads the model.

:func:`pipeline.tracking.model_logging.log_scan_model` logs this file (not a pickled object) as the
``python_model``, so loading runs reviewed source code instead of unpickling. Not meant to be imported.
"""

from mlflow.models import set_model

from pipeline.tracking.pyfunc_model import ScanSegmenter

set_model(ScanSegmenter())
