import pytest
import jsonschema
from cml_appliance.projects import files
from tests.integration.test_swagger_client import cml, cml_swagger, offline  # noqa

@pytest.mark.parametrize("mutate", ["int_size", "bad_date", "extra"])
async def test_caught(cml, make_user, monkeypatch, mutate):
    from cml_appliance.projects import api
    orig_list, orig_pj = files.list_dir, api.project_json
    def bad_list(root, path):
        out = orig_list(root, path)
        for d in out:
            if "file_size" in d: d["file_size"] = int(d["file_size"])
        return out
    def bad_pj(p):
        d = orig_pj(p)
        if mutate == "bad_date": d["created_at"] = "2026-01-01 10:00"
        else: d["colour"] = "red"
        return d
    if mutate == "int_size": monkeypatch.setattr(files, "list_dir", bad_list)
    else: monkeypatch.setattr(api, "project_json", bad_pj)
    alice = await make_user("alice")
    if mutate == "int_size":
        pid = (await cml("CreateProject", alice, body={"name": "f"}))["id"]
        await cml.response("UploadFile", alice, project_id=pid, file=("a.txt", b"x"))
        with pytest.raises(jsonschema.ValidationError) as e:
            await cml("ListProjectFiles", alice, project_id=pid, path="")
    elif mutate == "bad_date":
        with pytest.raises(jsonschema.ValidationError) as e:
            await cml("CreateProject", alice, body={"name": "f"})
    else:
        with pytest.raises(AssertionError) as e:
            await cml("CreateProject", alice, body={"name": "f"})
    print("CAUGHT:", mutate, str(e.value).splitlines()[0])
