"""OpenAI-shaped requests sent to an Azure upstream (fwd.azure)."""

from __future__ import annotations

import pytest

from fwd.azure import Unmapped, azure_target

DEPLOYMENTS = {"gpt-4o": "my-gpt4o", "whisper-1": "whisper"}


@pytest.mark.parametrize("rest,model,expected", [
    (b"v1/chat/completions", "gpt-4o", b"openai/deployments/my-gpt4o/chat/completions"),
    (b"v1/chat/completions", "gpt-4o-mini", b"openai/deployments/gpt-4o-mini/chat/completions"),
    (b"v1/embeddings", "gpt-4o", b"openai/deployments/my-gpt4o/embeddings"),
    (b"v1/completions/", "gpt-4o", b"openai/deployments/my-gpt4o/completions"),
    (b"v1/audio/transcriptions", "whisper-1", b"openai/deployments/whisper/audio/transcriptions"),
    (b"v1/images/generations", "dall-e-3", b"openai/deployments/dall-e-3/images/generations"),
    (b"v1/models", None, b"openai/models"),
    (b"v1/files", None, b"openai/files"),
])
def test_openai_paths_go_to_deployments_with_the_api_version(rest, model, expected):
    path, query = azure_target(rest, None, model, DEPLOYMENTS, "2024-10-21")
    assert (path, query) == (expected, b"api-version=2024-10-21")


def test_the_clients_query_is_kept_and_its_own_api_version_wins():
    assert azure_target(b"v1/models", b"limit=2", None, {}, "2024-10-21")[1] == b"limit=2&api-version=2024-10-21"
    assert azure_target(b"v1/models", b"api-version=x", None, {}, "2024-10-21")[1] == b"api-version=x"


def test_responses_go_to_the_v1_api_unless_the_deployment_has_another_name():
    assert azure_target(b"v1/responses", None, "gpt-4o-mini", DEPLOYMENTS, "v") == (b"openai/v1/responses", None)
    with pytest.raises(Unmapped):
        azure_target(b"v1/responses", None, "gpt-4o", DEPLOYMENTS, "v")


def test_a_deployment_operation_without_a_model_cannot_be_mapped():
    with pytest.raises(Unmapped):
        azure_target(b"v1/chat/completions", None, None, DEPLOYMENTS, "v")


def test_a_deployment_name_cannot_leave_its_path_segment():
    path, _ = azure_target(b"v1/chat/completions", None, "../x?y", {}, "v")
    assert path == b"openai/deployments/..%2Fx%3Fy/chat/completions"


def test_paths_that_are_not_the_openai_api_pass_as_they_came():
    assert azure_target(b"openai/deployments/d/chat/completions", b"api-version=1", "gpt-4o", DEPLOYMENTS, "v") == (
        b"openai/deployments/d/chat/completions", b"api-version=1")


def test_a_model_that_would_be_a_dot_segment_is_not_sent():
    for name in (".", ".."):
        with pytest.raises(Unmapped):
            azure_target(b"v1/chat/completions", None, name, {}, "v")


def test_a_clients_api_version_in_any_case_is_kept_alone():
    assert azure_target(b"v1/models", b"API-Version=x", None, {}, "v")[1] == b"API-Version=x"
