"""The entry point of a model built from the model registry (CreateModelBuild with a
registered_model_version_id). The build puts it, with the version's MLflow model in ./model, into
the build's snapshot; it runs in the runtime (which needs mlflow and the model's own libraries,
scikit-learn for a scikit-learn model), never in the appliance.

CML calls predict with the request's "request" object. Accepted shapes: a list of rows;
{"columns": [...], "data": [[...]]} or {"dataframe_split": {...}} (pandas' split form);
{"dataframe_records": [{...}]}; {"inputs": ...} or {"instances": ...} (MLflow's serving forms).
"""

from pathlib import Path

import mlflow.pyfunc

MODEL = mlflow.pyfunc.load_model(str(Path(__file__).resolve().parent / "model"))


def _as_input(args):
    import numpy as np
    import pandas as pd

    data = args
    if isinstance(args, dict):
        if "dataframe_split" in args:
            split = args["dataframe_split"]
            data = pd.DataFrame(data=split.get("data"), columns=split.get("columns"))
        elif "columns" in args and "data" in args:
            data = pd.DataFrame(data=args["data"], columns=args["columns"])
        elif "dataframe_records" in args:
            data = pd.DataFrame.from_records(args["dataframe_records"])
        elif "inputs" in args:
            data = args["inputs"]
        elif "instances" in args:
            data = args["instances"]
    if isinstance(data, list):
        data = np.asarray(data)
    return data


def predict(args):
    result = MODEL.predict(_as_input(args))
    if hasattr(result, "to_dict"):  # a DataFrame or Series
        return result.to_dict(orient="list") if hasattr(result, "columns") else result.tolist()
    return result.tolist() if hasattr(result, "tolist") else result
