"""GET /v1/openapi.json: the whole API as an OpenAPI 3.1 document, built from the code itself.

It is built by walking the routes of the app that serves it: every route whose handler declares
its operation (`@operation`, service/api/operations.py) is documented by what it declares, its
scopes becoming its security requirements. The JSON Schemas come from the pydantic models that
validate requests and shape answers, so the document cannot drift from them;
`tests/test_openapi.py` checks that every route the app serves is documented and fuzzes the
running API against the document.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from service.api.auth import PUBLIC_PATHS
from service.api.errors import ErrorBody
from service.api.middleware import REQUEST_ID_HEADER
from service.api.operations import TOKEN_ERRORS, Answer, Declared, Param, declared, operation
from service.domain.access import Scope

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
SCHEMA_REF = "#/components/schemas/{model}"
# `x-scopes` on an operation: the scopes of which a token needs any one.
SCOPES_EXTENSION = "x-scopes"
NO_CONTENT = 204

routes = web.RouteTableDef()


class OpenApiDocument(BaseModel):
    """This document."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


@routes.get("/v1/openapi.json")
@operation(
    "This document",
    tag="meta",
    scopes=(Scope.READ, Scope.WRITE, Scope.OPS),
    answers={200: Answer(OpenApiDocument, "The OpenAPI 3.1 document of this API")},
)
async def openapi(request: web.Request) -> web.Response:
    """This API as an OpenAPI 3.1 document."""
    return web.json_response(document_of(request.app.router))


# --- The routes ----------------------------------------------------------------------------------

Route = tuple[str, str, Handler]


@dataclasses.dataclass(frozen=True)
class Operation:
    """A route, and what its handler declares."""

    method: str
    path: str
    handler: Handler
    declared: Declared

    @property
    def scopes(self) -> frozenset[Scope]:
        """A token needs any one of these."""
        return self.declared.scopes

    @property
    def needs_token(self) -> bool:
        """As the `authenticate` middleware decides it, or the handler itself (/metrics)."""
        v1 = self.path.startswith("/v1/") and self.path not in PUBLIC_PATHS
        return v1 or bool(self.scopes)


def routes_of(router: web.UrlDispatcher) -> tuple[Route, ...]:
    """(method, path, handler) of every route, in the order they were added; aiohttp's implicit
    HEAD for each GET is left out, as OpenAPI documents leave it out."""
    return tuple(
        (route.method, route.resource.canonical, route.handler)
        for route in router.routes()
        if route.method != "HEAD" and route.resource is not None
    )


def operations_of(served: Iterable[Route]) -> tuple[Operation, ...]:
    """The routes whose handlers declare an operation (not, say, the dashboard's pages)."""
    found = []
    for method, path, handler in served:
        declaration = declared(handler)
        if declaration is not None:
            found.append(Operation(method, path, handler, declaration))
    return tuple(found)


def document_of(router: web.UrlDispatcher) -> dict[str, Any]:
    """The OpenAPI document of the router's operations; built once per set of routes."""
    return _document(routes_of(router))


@functools.lru_cache(maxsize=4)
def _document(served: tuple[Route, ...]) -> dict[str, Any]:
    return build_document(operations_of(served))


# --- The document --------------------------------------------------------------------------------

DESCRIPTION = """\
Subscriptions to ShipEngine package tracking, their events and status history, ops views and
levers, and ShipEngine's `track` webhook.

Every `/v1` operation but the webhook needs `Authorization: Bearer <token>`; a token carries
scopes (`subscriptions:write`, `subscriptions:read`, `ops`) and each operation needs any one of
those listed as its security requirements (also in `x-scopes`). No token, or an unknown or
revoked one: 401; a token without the scope: 403. `/metrics` needs the `metrics` scope.

Every error has ShipEngine's error shape (`ErrorBody`); every answer carries `X-Request-ID`.
"""


ERROR_DESCRIPTIONS = {
    400: "Unreadable: the body is not JSON, or a query parameter is invalid",
    401: "No token, or an unknown or revoked one",
    403: "The token lacks the scope",
    404: "No such resource",
    409: "Not allowed in the resource's current state",
    410: "The cursor is older than what is kept: start again without it",
    413: "The body is too large",
    415: "The body is not `application/json`",
    422: "A field is invalid: one error per field",
    429: "Too many of these in flight for the caller's client; retry when one has ended",
    503: "The database is unreachable; retry",
}


def build_document(operations: Iterable[Operation]) -> dict[str, Any]:
    operations = tuple(operations)
    refs, schemas = _schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item = paths.setdefault(op.path, {})
        item[op.method.lower()] = _operation(op, refs, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Shipment tracking service",
            "version": _version(),
            "description": DESCRIPTION,
        },
        "tags": [{"name": name} for name in dict.fromkeys(op.declared.tag for op in operations)],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                _error_name(status): {
                    "description": description,
                    "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    "content": {"application/json": {"schema": refs[(ErrorBody, "serialization")]}},
                }
                for status, description in ERROR_DESCRIPTIONS.items()
            },
            "headers": {
                "RequestId": {
                    "description": "The caller's `X-Request-ID`, or a new one; also in logs",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `python -m service tokens create`",
                }
            },
        },
    }


Key = tuple[type[BaseModel], JsonSchemaMode]


def _schemas(operations: tuple[Operation, ...]) -> tuple[dict[Key, Any], dict[str, Any]]:
    """One JSON Schema per model (requests as validated, answers as serialised), shared defs."""
    keys: dict[Key, None] = {(ErrorBody, "serialization"): None}
    for op in operations:
        for model in (op.declared.query, op.declared.body):
            if model is not None:
                keys[(model, "validation")] = None
        for answer in op.declared.answers.values():
            if answer.model is not None:
                keys[(answer.model, "serialization")] = None
    refs, top = models_json_schema(list(keys), ref_template=SCHEMA_REF)
    return {key: refs[key] for key in keys}, dict(top.get("$defs", {}))


def _operation(
    op: Operation, refs: Mapping[Key, Any], schemas: Mapping[str, Any]
) -> dict[str, Any]:
    declaration = op.declared
    spec: dict[str, Any] = {
        "operationId": getattr(op.handler, "__name__", op.path),
        "summary": declaration.summary,
        "tags": [declaration.tag],
    }
    description = declaration.description
    errors = set(declaration.errors)
    scopes = sorted(scope.value for scope in op.scopes)
    if op.needs_token:
        needs = " or ".join(f"`{scope}`" for scope in scopes) if scopes else "any scope"
        description = f"{description}\n\nNeeds a token with the scope {needs}.".strip()
        spec["security"] = [{SECURITY_SCHEME: [scope]} for scope in scopes] or [
            {SECURITY_SCHEME: []}
        ]
        spec[SCOPES_EXTENSION] = scopes
        errors.update(TOKEN_ERRORS)
    else:
        spec["security"] = []
    if description:
        spec["description"] = description
    parameters = [
        *(_parameter(name, "path", param, required=True) for name, param in _path(op)),
        *(_parameter(name, "header", param) for name, param in declaration.headers.items()),
    ]
    if declaration.query is not None:
        parameters += _query_parameters(refs[(declaration.query, "validation")], schemas)
    if parameters:
        spec["parameters"] = parameters
    if declaration.body is not None:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(declaration.body, "validation")]}},
        }
    responses: dict[str, Any] = {}
    for status, answer in declaration.answers.items():
        schema = (
            {"type": "string"} if answer.model is None else refs[(answer.model, "serialization")]
        )
        responses[str(status)] = {
            "description": answer.description,
            "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
        }
        if status != NO_CONTENT:  # a 204 has no body, so no media type
            responses[str(status)]["content"] = {answer.media_type: {"schema": schema}}
    for status in sorted(errors):
        responses[str(status)] = {"$ref": f"#/components/responses/{_error_name(status)}"}
    spec["responses"] = responses
    return spec


def _path(op: Operation) -> list[tuple[str, Param]]:
    names = re.findall(r"{([^}/]+)}", op.path)
    described = op.declared.path_params
    if set(names) != set(described):
        raise ValueError(f"{op.path}: path parameters {names} are not all described")
    return [(name, described[name]) for name in names]


def _parameter(name: str, where: str, param: Param, *, required: bool = False) -> dict[str, Any]:
    parameter: dict[str, Any] = {"name": name, "in": where, "required": required}
    if param.description:
        parameter["description"] = param.description
    parameter["schema"] = dict(param.schema)
    return parameter


def _query_parameters(ref: Mapping[str, Any], schemas: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A query model's fields, one parameter each; an absent parameter is the model's None."""
    model = schemas[ref["$ref"].rsplit("/", 1)[-1]]
    required = set(model.get("required", []))
    parameters = []
    for name, schema in model["properties"].items():
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
        if "description" in schema:
            parameter["description"] = schema["description"]
        parameter["schema"] = _without_null(schema)
        parameters.append(parameter)
    return parameters


def _without_null(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`X | None = None` as a query parameter: absent, or an X (a query has no null)."""
    result = {key: value for key, value in schema.items() if key != "description"}
    if result.get("default", ...) is None:
        del result["default"]
    options = result.get("anyOf")
    if options is not None:
        kept = [option for option in options if option != {"type": "null"}]
        del result["anyOf"]
        if len(kept) == 1:
            result |= kept[0]
        else:
            result["anyOf"] = kept
    return result


def _error_name(status: int) -> str:
    return f"Error{status}"


def _version() -> str:
    try:
        return importlib.metadata.version("shipment-tracking-service")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
