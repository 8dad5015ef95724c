"""GET /v1/openapi.json: it covers every route, is valid OpenAPI 3.1, and the API keeps to it.

The last test runs schemathesis against the API on a real loopback port and a real database:
for every operation, generated inputs (valid and invalid) never get a 5xx, and every answer is
documented (status, content type, headers, body schema).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import hypothesis
import hypothesis.errors
import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase
from hypothesis.strategies import SearchStrategy
from pydantic import BaseModel
from schemathesis import APIOperation, GenerationMode
from schemathesis import Case as AnyCase
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import OPERATIONS, create_app, document
from service.api.health import DispatchState, Readiness
from service.api.openapi import SECURITY_SCHEME
from service.api.ops import OpsSummary, TimelineEntry
from service.api.schemas import WebhookReceipt
from service.dispatcher.worker import Dispatcher
from service.settings import Settings
from service.simulator import SigningKeys
from tests.conftest import RunningSimulator
from tests.payloads import track_body
from tests.webhook_sender import WEBHOOK, WebhookSender

Client = TestClient[web.Request, web.Application]
Operation = APIOperation[Any, Any, Any, Any]
Case = AnyCase[Operation]

# Generated inputs per operation and variant (mode, fixed path parameters, signing): enough to
# reach every validation branch, few enough for the whole fuzz to take well under a minute.
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # more for a deeper look, locally
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# Served by the app but not its API: the ops dashboard's HTML pages, a sub-application.
NOT_API = ("/dashboard",)


def served_routes() -> set[tuple[str, str, object]]:
    """(method, path, handler) of every API route the app registers; aiohttp's implicit HEAD for
    each GET is left out, as OpenAPI documents leave it out."""
    app = create_app(Settings(database_url="postgresql://unused@127.0.0.1/unused"))
    routes: set[tuple[str, str, object]] = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if route.method == "HEAD" or any(path.startswith(prefix) for prefix in NOT_API):
            continue
        routes.add((route.method, path, route.handler))
    return routes


def test_the_registry_covers_exactly_the_routes_the_app_serves() -> None:
    documented = {(op.method, op.path, op.handler) for op in OPERATIONS}
    served = served_routes()
    assert not served - documented, "served but not documented: no @operation on its handler"
    assert not documented - served, "documented but not served"
    assert len(documented) == len(OPERATIONS), "an operation is registered twice"


def test_every_operation_states_its_security_as_the_handler_enforces_it() -> None:
    paths = document()["paths"]
    for op in OPERATIONS:
        spec = paths[op.path][op.method.lower()]
        scopes = sorted(scope.value for scope in op.scopes)
        if (op.path.startswith("/v1/") and op.path != WEBHOOK) or op.path == "/metrics":
            assert scopes, f"{op.method} {op.path} declares no scopes in its @operation"
            assert spec["security"] == [{SECURITY_SCHEME: [scope]} for scope in scopes]
            assert spec["x-scopes"] == scopes
            assert {"401", "403"} <= set(spec["responses"])
        else:
            assert spec["security"] == []


def test_the_document_is_valid_openapi_3_1() -> None:
    raw = document()
    assert raw["openapi"].startswith("3.1.")
    schema = schemathesis.openapi.from_dict(json.loads(json.dumps(raw)))
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) == len(OPERATIONS)
    # What the meta-schema cannot see: every reference resolves, ids are unique, every path
    # template's parameters are declared in the path.
    for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(raw)):
        target: Any = raw
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    # Nor the Schema Objects: each must be valid JSON Schema 2020-12, OpenAPI 3.1's dialect
    # (jsonschema_rs is schemathesis' own validator; it checks `$ref`s above, not here).
    for schema_object in schema_objects(raw):
        jsonschema_rs.meta.validate(schema_object)
    ids = [spec["operationId"] for item in raw["paths"].values() for spec in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in raw["paths"].items():
        for spec in item.values():
            declared = {p["name"] for p in spec.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{([^}]+)}", path)), path
            for status, answer in spec["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d", status)
                assert "$ref" in answer or "description" in answer


def schema_objects(raw: dict[str, Any]) -> list[Any]:
    found = list(raw["components"]["schemas"].values())
    pending: list[Any] = [raw["paths"], raw["components"]]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if isinstance(item.get("schema"), dict):
                found.append(item["schema"])
            pending.extend(value for key, value in item.items() if key not in ("schema", "schemas"))
        elif isinstance(item, list):
            pending.extend(item)
    return found


async def test_the_document_is_served_to_any_token(api: Client) -> None:
    response = await api.get("/v1/openapi.json")
    assert response.status == 200
    assert await response.json() == json.loads(json.dumps(document()))
    anonymous = await api.get("/v1/openapi.json", headers={"Authorization": ""})
    assert anonymous.status == 401


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Rows for path parameters, so fuzzing reaches answers other than 404."""

    subscriptions: tuple[str, ...]
    deliveries: tuple[int, ...]


async def seed(
    api: Client, shipengine: RunningSimulator, dispatcher: Dispatcher, hooks: WebhookSender
) -> Seeds:
    shipengine.simulator.script("BAD1", status=400, error_code="invalid_identifier")
    ids = []
    for carrier_code, number in (("stamps_com", "9405511899223197428490"), ("ups", "BAD1")):
        response = await api.post(
            "/v1/subscriptions", json={"carrier_code": carrier_code, "tracking_number": number}
        )
        assert response.status == 202
        ids.append((await response.json())["id"])
    await dispatcher.drain()  # one active, one failed
    filed = await hooks.deliver(track_body("9405511899223197428490", "stamps_com", 4))
    orphan = await hooks.deliver(track_body("NOBODY", "ups", 1))
    assert (filed["outcome"], orphan["outcome"]) == ("filed", "orphan")
    return Seeds(tuple(ids), (filed["delivery_id"], orphan["delivery_id"]))


@dataclasses.dataclass(frozen=True)
class Variant:
    mode: GenerationMode
    path_parameters: Mapping[str, Any] | None = None
    signed: bool = False

    def __str__(self) -> str:
        signed = " signed" if self.signed else ""
        return f"{self.mode.value} {dict(self.path_parameters or {})}{signed}"


def variants(operation: Operation, seeds: Seeds) -> list[Variant]:
    path = operation.path
    fixed: list[Mapping[str, Any] | None] = [None]
    if "{id}" in path:
        known = seeds.deliveries if path.startswith("/v1/webhooks/") else seeds.subscriptions
        fixed += [{"id": value} for value in known]
    found = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        found += [Variant(mode, params) for params in fixed]
        if path == WEBHOOK:
            found.append(Variant(mode, None, signed=True))
    return found


# What would leave the seeded failed subscription nothing else to answer (a retry of it: 409).
LAST = ("POST /v1/ops/retry", "DELETE /v1/subscriptions/{id}")


def fuzz(raw: dict[str, Any], base_url: str, token: str, seeds: Seeds, keys: SigningKeys) -> str:
    """Every operation, every variant; what failed, one paragraph each (empty: nothing)."""
    schema = schemathesis.openapi.from_dict(raw)
    auth = {"Authorization": f"Bearer {token}"}
    found: list[str] = []
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    for operation in sorted(operations, key=lambda operation: operation.label in LAST):
        for variant in variants(operation, seeds):
            send = _signed_call(keys) if variant.signed else _call
            strategy = operation.as_strategy(
                generation_mode=variant.mode,
                path_parameters=dict(variant.path_parameters or {}),
            )
            try:
                _run(strategy, send, base_url, auth)
            except hypothesis.errors.Unsatisfiable:
                continue  # nothing to make invalid in this operation
            except (Exception, BaseExceptionGroup) as error:  # schemathesis: FailureGroup
                found.append(f"{operation.label} [{variant}]:\n{error}")
    return "\n\n".join(found)


Send = Callable[[Case, str, dict[str, str]], None]


def _run(strategy: SearchStrategy[Case], send: Send, base_url: str, auth: dict[str, str]) -> None:
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,  # no .hypothesis/ folder
        derandomize=True,  # the same inputs on every run: a failure here is reproducible
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @hypothesis.given(case=strategy)
    def test(case: Case) -> None:
        send(case, base_url, auth)

    test()


def _call(case: Case, base_url: str, headers: dict[str, str]) -> None:
    response = case.call(base_url=base_url, headers=headers, timeout=10)
    case.validate_response(response, checks=CHECKS, headers=headers)


def _signed_call(keys: SigningKeys) -> Send:
    """The webhook with the generated body signed as ShipEngine signs: past verification."""

    def call(case: Case, base_url: str, headers: dict[str, str]) -> None:
        if isinstance(case.body, NotSet):
            data = b""
        elif isinstance(case.body, bytes):  # negative mode: not JSON at all
            data = case.body
        else:
            data = json.dumps(case.body).encode()
        sent = {**headers, "Content-Type": "application/json", **keys.headers(data)}
        response = case.call(base_url=base_url, headers=sent, data=data, timeout=10)
        case.validate_response(response, checks=CHECKS, headers=sent)

    return call


@pytest.mark.timeout(240)
async def test_the_api_keeps_to_its_document(
    api: Client,
    token: str,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    hooks = WebhookSender(api, shipengine.simulator.keys)
    seeds = await seed(api, shipengine, make_dispatcher(), hooks)
    raw = await (await api.get("/v1/openapi.json")).json()
    base_url = str(api.make_url("")).rstrip("/")

    started = time.monotonic()
    # schemathesis calls are blocking: off the loop, which goes on serving them.
    found = await asyncio.to_thread(fuzz, raw, base_url, token, seeds, shipengine.simulator.keys)
    elapsed = time.monotonic() - started
    assert not found, f"the API strays from its document ({elapsed:.0f} s of fuzzing):\n{found}"


# Bugs this fuzz found outside service/api/, fixed: each stays as a regression test.


async def test_replaying_an_id_beyond_bigint_is_404(api: Client) -> None:
    response = await api.post(f"/v1/webhooks/deliveries/{2**63}/replay")
    assert response.status == 404


async def test_replaying_a_range_beyond_python_dates_is_422(api: Client) -> None:
    body = {"received_from": "0001-01-01T00:00:00+14:00", "received_to": "2026-01-01T00:00:00Z"}
    response = await api.post("/v1/webhooks/deliveries/replay", json=body)
    assert response.status == 422


async def test_a_webhook_with_nul_in_its_text_is_filed(
    api: Client, shipengine: RunningSimulator
) -> None:
    subscribed = await api.post(
        "/v1/subscriptions", json={"carrier_code": "ups", "tracking_number": "NUL1"}
    )
    assert subscribed.status == 202
    body = track_body("NUL1", "ups", 2)
    body["data"]["events"][0]["description"] = "Departed\u0000facility"
    answer = await WebhookSender(api, shipengine.simulator.keys).deliver(body, 200)
    assert answer["outcome"] == "filed"


async def test_a_webhook_nested_too_deep_is_400(api: Client, shipengine: RunningSimulator) -> None:
    data = b"[" * 100_000 + b"]" * 100_000
    await WebhookSender(api, shipengine.simulator.keys).deliver(data, 400)


def assert_declared(model: type[BaseModel], answer: dict[str, Any]) -> None:
    """The answer is what `model` says, and names nothing `model` does not declare."""
    model.model_validate(answer)
    assert set(answer) <= set(model.model_fields), set(answer) - set(model.model_fields)


async def test_answers_written_as_dicts_name_only_what_their_models_declare(
    api: Client, shipengine: RunningSimulator
) -> None:
    """A few handlers keep a faster or exactly shaped answer than their model would write; the
    document still describes them, so a field they add must be declared there too."""
    created = await (
        await api.post("/v1/subscriptions", json={"carrier_code": "ups", "tracking_number": "D1"})
    ).json()
    body = json.dumps(track_body("D1", "ups", 1)).encode()
    headers = {"Content-Type": "application/json", **shipengine.simulator.keys.headers(body)}
    receipt = await (await api.post("/v1/webhooks/shipengine", data=body, headers=headers)).json()
    assert_declared(WebhookReceipt, receipt)
    assert_declared(OpsSummary, await (await api.get("/v1/ops/summary")).json())
    ready = await (await api.get("/readyz")).json()
    assert_declared(Readiness, ready)
    assert_declared(DispatchState, ready["dispatch"])
    timeline = await (await api.get(f"/v1/subscriptions/{created['id']}/timeline")).json()
    assert timeline["items"]
    for entry in timeline["items"]:
        assert_declared(TimelineEntry, entry)
