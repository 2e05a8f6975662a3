"""MLflow models-from-code entry point for the MVTCAE pyfunc; MLflow executes it, nobody imports it.

`mvtcae.tracking.log_pyfunc_model` logs this file as the model's code; MLflow runs it at save and
load time, and ``set_model`` tells MLflow which object answers requests. See
`mvtcae.tracking.pyfunc`.
"""

from mlflow.models import set_model

from mvtcae.tracking.pyfunc import MVTCAEPythonModel

set_model(MVTCAEPythonModel())
