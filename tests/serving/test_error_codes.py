"""The error codes the server can send, their registry (protocol.ERROR_CODES) and docs/serving.md's table agree.

Codes are collected from the source: every ``APIError(...)`` the server raises, and where a call passes a
computed code, the exceptions it comes from (InvalidImageError, AdmissionError) and starlette's routing
errors. A new code, or a code that no longer exists, fails here until the registry and the docs follow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vllm_layered.serving.api_server  # noqa: F401  (imports every AdmissionError subclass the server raises)
from vllm_layered.serving.protocol import ERROR_CODES
from vllm_layered.serving.tenants import AdmissionError

ROOT = Path(__file__).resolve().parents[2]
SERVING = ROOT / "vllm_layered" / "serving"
# Calls that pass a computed code, and where it comes from (checked below).
COMPUTED_CODE_SITES = {
    ("intake.py", "load_request_image"),  # InvalidImageError.code
    ("intake.py", "_read_generation"),  # InvalidImageError.code of the canvas bucket
    ("errors.py", "admission_error"),  # AdmissionError.reason
    ("api_server.py", "http_error"),  # f"http_{status}" of starlette's routing errors
}
ROUTING_CODES = {"http_404": 404, "http_405": 405}  # unknown path, known path with another method
# Raised only for a file path; the server decodes uploaded bytes.
PATH_ONLY_IMAGE_CODES = {"unreadable_file"}


def _calls(path: Path, name: str) -> list[tuple[ast.Call, str]]:
    """Every call of ``name`` in the file, with the name of the innermost function around it."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name:
            found.append((node, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def _first_string_arguments(path: Path, name: str) -> set[str]:
    return {
        call.args[0].value
        for call, _ in _calls(path, name)
        if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
    }


def server_codes() -> dict[str, set[int]]:
    """Every code the server's modules can send, with the statuses it is sent with."""
    codes: dict[str, set[int]] = {}
    computed_sites = set()
    for path in sorted(SERVING.rglob("*.py")):
        if "omni" in path.relative_to(SERVING).parts:
            continue  # the vLLM-Omni route answers inside vLLM-Omni's server, with its conventions
        for call, function in _calls(path, "APIError"):
            keywords = {k.arg: k.value for k in call.keywords}
            assert "code" in keywords, f"{path.name}:{call.lineno}: an APIError without a code"
            code, status = keywords["code"], call.args[0]
            if isinstance(code, ast.Constant) and isinstance(status, ast.Constant):
                codes.setdefault(code.value, set()).add(status.value)
            else:
                computed_sites.add((path.name, function))
    assert computed_sites == COMPUTED_CODE_SITES
    image_codes = _first_string_arguments(ROOT / "vllm_layered/model_executor/image_processing.py", "InvalidImageError")
    for code in image_codes - PATH_ONLY_IMAGE_CODES:  # load_request_image takes the status from the registry
        codes.setdefault(code, set()).add(ERROR_CODES.get(code, 400))
    for reason in _first_string_arguments(SERVING / "tenants.py", "AdmissionError"):
        codes.setdefault(reason, set()).add(429)
    for error in AdmissionError.__subclasses__():  # a fixed reason with its own status (e.g. the store is down)
        codes.setdefault(error("").reason, set()).add(error.status_code)
    for code, status in ROUTING_CODES.items():
        codes.setdefault(code, set()).add(status)
    return codes


def documented_codes() -> dict[str, int]:
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d{3}) \| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)
    codes = [code for _, code in rows]
    assert len(codes) == len(set(codes)), "a code is listed twice"
    return {code: int(status) for status, code in rows}


def test_the_registry_holds_exactly_the_codes_the_server_sends():
    sent = server_codes()
    assert {code: sorted(statuses) for code, statuses in sent.items()} == {
        code: [status] for code, status in ERROR_CODES.items()
    }


def test_the_docs_list_exactly_the_registry():
    assert documented_codes() == ERROR_CODES
