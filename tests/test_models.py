"""Model allow-lists: what a forward key limited to some models may make the upstream run, and every way of
talking around it that is refused."""

import json

import pytest

from fwd import jsonscan, models

ALLOWED = frozenset({"gpt-4o-mini", "my-mini"})


def named_json(body) -> models.Named:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return models.json_named(jsonscan.scan(raw, ["model"]))


def judge(method, path, named) -> str | None:
    return models.decide(ALLOWED, method, path, named)


def form(*fields, boundary="b0undary"):
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}".encode()


def test_an_allowed_model_in_a_json_body_passes_and_another_is_refused_by_name():
    assert judge(b"POST", b"/v1/chat/completions", named_json({"model": "gpt-4o-mini", "messages": []})) is None
    why = judge(b"POST", b"/v1/chat/completions", named_json({"messages": [], "model": "gpt-4o"}))
    assert why == "this key may not use the model 'gpt-4o'"


def test_a_model_nested_inside_the_body_is_not_the_request_model():
    body = {"messages": [{"role": "user", "content": "x", "model": "gpt-4o-mini"}]}
    assert "name one of them" in judge(b"POST", b"/v1/chat/completions", named_json(body))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gpt-4o-mini", "model": "gpt-4o"}',
        b'{"model": "gpt-4o-mini", "mod\\u0065l": "gpt-4o"}',
        b'{"model": "gpt-4o-mini", "Model": "gpt-4o"}',
    ],
)
def test_a_model_given_twice_under_any_spelling_is_refused(raw):
    assert "more than once" in judge(b"POST", b"/v1/chat/completions", named_json(raw))


def test_a_body_that_is_not_json_cannot_pass_for_a_write():
    assert "not valid JSON" in judge(b"POST", b"/v1/chat/completions", named_json(b'{"model": "gpt-4o-mini",'))


def test_a_post_that_names_no_model_is_refused_reads_deletes_uploads_and_cancels_pass():
    assert "name one of them" in judge(b"POST", b"/v1/images/generations", named_json({"prompt": "a cat"}))
    assert "name one of them" in judge(b"POST", b"/v1/vector_stores/vs_1/files", models.NOTHING)
    for method, path in [
        (b"GET", b"/v1/models"), (b"HEAD", b"/v1/files/f1"), (b"DELETE", b"/v1/files/f1"),
        (b"POST", b"/v1/files"), (b"POST", b"/v1/uploads"), (b"POST", b"/v1/uploads/up_1/parts"),
        (b"POST", b"/v1/responses/resp_1/cancel"), (b"POST", b"/openai/files"),
    ]:
        assert judge(method, path, models.NOTHING) is None, (method, path)


def test_batches_are_refused_whatever_model_the_request_names():
    why = judge(b"POST", b"/v1/batches", named_json({"input_file_id": "f1", "model": "gpt-4o-mini"}))
    assert why.startswith("batches run the models their input file names")
    assert judge(b"GET", b"/v1/batches", models.NOTHING) is None
    assert judge(b"POST", b"/v1/batches/batch_1/cancel", models.NOTHING) is None


@pytest.mark.parametrize(
    "path",
    [
        b"/openai/deployments/gpt-4o/chat/completions",
        b"/openai/Deployments/gpt-4o/chat/completions",
        b"/openai/%64eployments/gpt-4o/chat/completions",
        b"/openai/deployments/gpt%2D4o/chat/completions",
    ],
)
def test_an_azure_deployment_is_read_after_percent_decoding_and_in_any_case(path):
    named = models.path_named(path)
    assert named.models == ("gpt-4o",)
    assert judge(b"POST", path, named + named_json({"messages": []})) == "this key may not use the model 'gpt-4o'"


def test_an_ambiguous_deployment_path_is_refused():
    for path in (b"/openai/deployments/my-mini/x/deployments/gpt-4o/chat/completions",
                 b"/openai/deployments/my-mini%2F..%2Fgpt-4o/chat/completions"):
        assert judge(b"POST", path, models.path_named(path)) is not None, path


def test_a_body_model_that_differs_from_the_deployment_is_refused():
    path = b"/openai/deployments/my-mini/chat/completions"
    named = models.path_named(path) + named_json({"model": "gpt-4o-mini"})
    assert judge(b"POST", path, named) == "the request names more than one model"
    assert judge(b"POST", path, models.path_named(path) + named_json({"messages": []})) is None


def test_the_realtime_model_query_parameter_is_checked():
    assert judge(b"GET", b"/v1/realtime", models.query_named(b"model=gpt-4o-realtime")) is not None
    assert judge(b"GET", b"/v1/realtime", models.query_named(b"model=my-mini")) is None
    assert "more than once" in models.query_named(b"model=my-mini&model=gpt-4o").problem


def test_the_model_field_of_a_form_is_checked():
    body, ctype = form(("model", "gpt-4o-mini"), ("purpose", "x"))
    assert models.form_named(body, ctype).models == ("gpt-4o-mini",)
    body, ctype = form(("model", "whisper-1"))
    assert judge(b"POST", b"/v1/audio/transcriptions", models.form_named(body, ctype)) is not None


@pytest.mark.parametrize(
    "ctype, body",
    [
        (b'multipart/form-data; boundary=a; boundary=b', b"--a\r\n"),
        (b"multipart/form-data; boundary=safe; xboundary=evil", form(("model", "my-mini"), boundary="safe")[0]),
        (b"multipart/form-data; boundary=b0undary",
         b'--b0undary\r\nContent-Disposition: form-data; name = "model"\r\n\r\ngpt-4o\r\n--b0undary--\r\n'),
        (b"multipart/form-data; boundary=b0undary", form(("model", "my-mini"), ("model", "gpt-4o"))[0]),
    ],
)
def test_forms_that_servers_could_read_apart_are_refused(ctype, body):
    named = models.form_named(body, ctype)
    assert named.problem is not None and judge(b"POST", b"/v1/audio/transcriptions", named) is not None


@pytest.mark.parametrize(
    "types, encoding, expected",
    [
        ([b"application/json"], None, "json"),
        (None, None, "json"),
        ([b"multipart/form-data; boundary=x"], None, "form"),
        ([b"application/json"], [b"gzip"], "refuse:"),
        ([b"application/json", b"multipart/form-data; boundary=x"], None, "refuse:"),
        ([b"application/x-www-form-urlencoded"], None, "refuse:"),
    ],
)
def test_how_a_body_is_read_for_its_model(types, encoding, expected):
    assert models.body_kind(types, encoding, 10).startswith(expected)


def test_a_model_field_smuggled_inside_an_uploaded_file_is_not_believed():
    inner = "junk\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nmy-mini\r\n"
    body, ctype = form(("file", inner), ("model", "gpt-4o-transcribe"))
    named = models.form_named(body, ctype)
    assert "my-mini" not in named.models


def test_a_quoted_boundary_with_a_space_is_read_one_way_or_refused():
    body, _ = form(("model", "my-mini"), boundary="abc def")
    named = models.form_named(body, b'multipart/form-data; boundary="abc def"')
    assert named.models in ((), ("my-mini",)) and (named.models or named.problem)
