"""The OpenAPI 3.1 description of the API, served at ``/v1/openapi.json``.

Written by hand (the routes are few and the description is the contract devices code
against); a test checks it against the OpenAPI schema and against the app's routes.
"""

from __future__ import annotations

from typing import Any

from rtfq_deploy import __version__
from rtfq_deploy.formats import RUNTIMES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        out["headers"] = headers
    return out


def _header(description: str, schema_type: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": schema_type}}


_DEVICE = {"name": "device", "in": "path", "required": True, "description": "A device name from GET /v1/devices.",
           "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}}
_SHA = {"name": "sha256", "in": "path", "required": True, "description": "The file's sha256, lower-case hex.",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
_FILE_HEADERS = {
    "ETag": _header('The quoted sha256 of the whole file, e.g. "9f86d0...".'),
    "Accept-Ranges": _header("Always bytes."),
    "Cache-Control": _header("public, max-age=31536000, immutable: a hash never names other bytes."),
}
_RETRY = {"Retry-After": _header("Seconds to wait before trying again.", "integer")}
_FILE_NAME = {"name": "file", "in": "path", "required": True, "description": "A candidate's file name, <subnet>.onnx.",
              "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}}
_RUNTIME_QUERY = {"name": "runtime", "in": "query", "required": False,
                  "description": "The runtime the device measures on (onnxruntime, openvino); every candidate "
                                 "runs on both.", "schema": {"type": "string", "enum": ["onnxruntime", "openvino"]}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string", "description": "What went wrong, one line."}},
        "additionalProperties": True},
    "Entry": {"type": "object", "description": "A manifest entry (rtfq_deploy.manifest.Entry) and its download URL.",
              "required": ["subnet", "path", "sha256", "size_bytes", "latency_p50_ms", "latency_p90_ms",
                           "peak_memory_bytes", "macs", "bitops", "accuracy", "budgets", "url"],
              "properties": {
                  "subnet": {"type": "string", "examples": ["r160-w0.73-q4"]},
                  "runtime": {"type": "string", "enum": list(RUNTIMES),
                              "description": "The runtime the figures were measured on and the file is meant for."},
                  "stable": {"type": "boolean",
                             "description": "false: the latency p50 did not settle when measured (a rough figure)."},
                  "accuracy_source": {"type": "string", "enum": ["measured", "table"],
                                      "description": "measured: top-1 on this runtime; table: rtfq eval's."},
                  "agreement": {"type": "number", "description": "Top-1 agreement with onnxruntime's exact results."},
                  "path": {"type": "string", "description": "<device>/<name>.onnx inside DIST_DIR."},
                  "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                  "size_bytes": {"type": "integer", "minimum": 0},
                  "latency_p50_ms": {"type": "number"},
                  "latency_p90_ms": {"type": "number"},
                  "peak_memory_bytes": {"type": "integer"},
                  "macs": {"type": "integer"},
                  "bitops": {"type": "integer"},
                  "accuracy": {"type": ["number", "null"]},
                  "budgets": {"type": "array", "items": {"type": "string"}},
                  "url": {"type": "string", "description": "/v1/files/<sha256>, relative to the server."}}},
    "DeviceSummary": {"type": "object", "required": ["name", "updated", "files", "runtimes", "fingerprint"],
                      "properties": {
        "name": {"type": "string"}, "updated": {"type": "string"},
        "runtimes": {"type": "array", "items": {"type": "string"}, "description": "Runtimes with verified entries."},
        "files": {"type": "integer", "description": "Verified files served for the device."},
        "fingerprint": {"type": "object"}}},
    "DeviceList": {"type": "object", "required": ["devices"], "properties": {
        "devices": {"type": "array", "items": _ref("DeviceSummary")}}},
    "Device": {"type": "object", "required": ["name", "updated", "fingerprint", "files"], "properties": {
        "name": {"type": "string"}, "updated": {"type": "string"}, "fingerprint": {"type": "object"},
        "files": {"type": "array", "items": _ref("Entry")}}},
    "Resolution": {"type": "object", "required": ["device", "budget", "reason", "entry"], "properties": {
        "device": {"type": "string"},
        "budget": {"type": "string", "description": "The budget as parsed, e.g. latency=20ms,memory=64MB."},
        "reason": {"type": "string"}, "entry": _ref("Entry")}},
    "Unmet": {"type": "object", "required": ["error", "device", "budget", "cheapest"], "properties": {
        "error": {"type": "string"}, "device": {"type": "string"}, "budget": {"type": "string"},
        "cheapest": _ref("Entry")}},
    "Candidate": {"type": "object", "required": ["file", "subnet", "sha256", "size_bytes", "macs", "bitops", "bits",
                                                 "accuracy", "url"], "properties": {
        "file": {"type": "string", "examples": ["r160-w0.73-q4.onnx"]}, "subnet": {"type": "string"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "size_bytes": {"type": "integer", "minimum": 0},
        "macs": {"type": "integer"}, "bitops": {"type": "integer"},
        "bits": {"type": ["object", "null"], "description": "Every quantizer's bits (the file's rtfq.bits)."},
        "accuracy": {"type": ["number", "null"], "description": "Top-1 from the server's accuracy table."},
        "url": {"type": "string", "description": "/v1/candidates/<file>, relative to the server."}}},
    "CandidateList": {"type": "object", "required": ["runtime", "checkpoint_sha256", "candidates"], "properties": {
        "runtime": {"type": ["string", "null"]},
        "checkpoint_sha256": {"type": ["string", "null"],
                              "description": "The checkpoint the accuracy table was measured on."},
        "candidates": {"type": "array", "items": _ref("Candidate")}}},
    "Choice": {"type": "object", "required": ["budget", "runtime", "met", "subnet", "reason", "straddles", "kept"],
               "properties": {
        "budget": {"type": "string"}, "runtime": {"type": "string"}, "met": {"type": "boolean"},
        "subnet": {"type": "string"}, "accuracy": {"type": ["number", "null"]},
        "latency_p50_ms": {"type": "number"},
        "latency_p50_ci_ms": {"type": ["array", "null"], "items": {"type": "number"},
                              "description": "95% interval of the p50 as measured by the device."},
        "reason": {"type": "string"},
        "straddles": {"type": "boolean", "description": "The p50 interval holds a latency limit of the budget: "
                                                        "measured again, the choice may differ."},
        "kept": {"type": "boolean", "description": "The device's previous choice for this budget, kept because the "
                                                   "new measurement cannot tell it from the new one."}}},
    "UploadAnswer": {"type": "object", "required": ["device", "rows", "choices", "written", "removed"], "properties": {
        "device": {"type": "string"}, "rows": {"type": "integer"},
        "choices": {"type": "array", "items": _ref("Choice")},
        "written": {"type": "array", "items": {"type": "object"}, "description": "The device's new manifest entries."},
        "removed": {"type": "array", "items": {"type": "string"}},
        "skipped": {"type": "array", "items": {"type": "string"}},
        "manifest_sha256": {"type": ["string", "null"]}}},
    "Health": {"type": "object", "required": ["status", "version", "generation", "manifest_sha256", "devices",
                                              "files", "excluded", "reload_error", "auth_error"], "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded"],
                   "description": "degraded: reload_error or auth_error is set; the manifest in service still is."},
        "version": {"type": "string"},
        "generation": {"type": "integer", "description": "Increases each time a manifest is loaded."},
        "manifest_sha256": {"type": ["string", "null"], "description": "sha256 of the manifest.json in service."},
        "loaded_at": {"type": "number", "description": "Unix time the manifest in service was loaded."},
        "devices": {"type": "integer"}, "files": {"type": "integer"},
        "excluded": {"type": "array", "description": "Manifest entries not served (file missing or mismatched).",
                     "items": {"type": "object", "properties": {
                         "device": {"type": "string"}, "path": {"type": "string"}, "reason": {"type": "string"}}}},
        "reload_error": {"type": ["string", "null"],
                         "description": "Why the newest manifest.json was not loaded (the previous one is served)."},
        "auth_error": {"type": ["string", "null"],
                       "description": "Set when the token file is unusable: every bearer token is refused."},
        "candidates": {"type": ["integer", "null"], "description": "Candidates offered (null: no --candidates)."}}},
}

# With --token-file every operation but health and this document needs a bearer token;
# without it, none does: hence "bearer, or nothing".
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {}]
_SECURITY_SCHEMES = {"bearer": {
    "type": "http", "scheme": "bearer",
    "description": "Required when the server runs with `--token-file`: `Authorization: Bearer <token>` with one "
                   "of the file's tokens. Without a valid token the answer is 401 with `WWW-Authenticate: Bearer`."}}


def _protected(paths: dict[str, Any]) -> dict[str, Any]:
    """Mark every operation outside /v1/health and /v1/openapi.json as bearer-protected (401)."""
    unauthorized = _json("No or a wrong bearer token (the server runs with --token-file).", "Error",
                         {"WWW-Authenticate": _header('Bearer realm="rtfq-serve"')})
    for path, ops in paths.items():
        if path in ("/v1/health", "/v1/openapi.json"):
            continue
        for op in ops.values():
            op["security"] = [dict(s) for s in _SECURITY]
            op["responses"]["401"] = unauthorized
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    not_found = _json("Unknown device.", "Error")
    return {
        "openapi": "3.1.0",
        "info": {"title": "rtfq-serve", "version": __version__,
                 "description": "Per-device model files of one DIST_DIR written by `rtfq-bench select` or by "
                                "devices' uploads (`rtfq enroll`). GET and HEAD, and POST of a device's results "
                                "only."},
        "paths": _protected({
            "/v1/health": {"get": {"operationId": "health", "summary": "Liveness and the manifest in service.",
                                   "responses": {"200": _json("Serving.", "Health")}}},
            "/v1/devices": {"get": {"operationId": "listDevices", "summary": "Devices with at least one manifest entry.",
                                    "responses": {"200": _json("The devices, by name.", "DeviceList")}}},
            "/v1/devices/{device}": {"get": {
                "operationId": "getDevice", "summary": "A device's verified entries.", "parameters": [_DEVICE],
                "responses": {"200": _json("The device.", "Device"), "404": not_found}}},
            "/v1/devices/{device}/resolve": {"get": {
                "operationId": "resolve",
                "summary": "The most accurate entry meeting a budget, with its download URL.",
                "parameters": [_DEVICE, {
                    "name": "budget", "in": "query", "required": True,
                    "description": "Limits that must all hold, the syntax of `rtfq-bench select`: "
                                   "latency=20ms,memory=64MB; 20ms; size=8MB; macs=0.8G; latency-p90=5ms.",
                    "schema": {"type": "string"}}, {
                    "name": "runtime", "in": "query", "required": False,
                    "description": "Only entries for this runtime (onnxruntime, openvino); without it, the best "
                                   "entry over every runtime the device has.",
                    "schema": {"type": "string"}}],
                "responses": {
                    "200": _json("The chosen entry.", "Resolution"),
                    "400": _json("Missing or malformed budget or runtime.", "Error"),
                    "404": _json("Unknown device, or no entry for the runtime asked for.", "Error"),
                    "422": _json("No entry meets the budget; the cheapest one is given.", "Unmet"),
                    "503": _json("The device's files are all being republished.", "Error", _RETRY)}}},
            "/v1/files/{sha256}": {
                "get": {
                    "operationId": "download", "parameters": [_SHA],
                    "summary": "A model file by content hash; conditional (If-None-Match) and resumable (Range).",
                    "description": "Single byte ranges only (`Range: bytes=a-b`, `bytes=a-`, `bytes=-n`); several "
                                   "ranges or a malformed Range header get the whole file. `If-Range` with the "
                                   "ETag guards a resumed download.",
                    "responses": {
                        "200": {"description": "The whole file.", "headers": _FILE_HEADERS,
                                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "contentMediaType": "application/octet-stream"}}}},
                        "206": {"description": "The requested byte range.",
                                "headers": {**_FILE_HEADERS, "Content-Range": _header("bytes a-b/size")},
                                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "contentMediaType": "application/octet-stream"}}}},
                        "304": {"description": "If-None-Match named this file's ETag.", "headers": _FILE_HEADERS},
                        "404": _json("No verified manifest entry has this hash.", "Error"),
                        "416": _json("The range starts beyond the end of the file.", "Error",
                                     {"Content-Range": _header("bytes */size")}),
                        "503": _json("The file changed on disk since it was verified; resolve again.", "Error",
                                     _RETRY)}},
                "head": {"operationId": "downloadHead", "parameters": [_SHA],
                         "summary": "The headers GET would send, without the body.",
                         "responses": {"200": {"description": "Headers only.", "headers": _FILE_HEADERS},
                                       "206": {"description": "Headers only, for the range."},
                                       "304": {"description": "Not modified.", "headers": _FILE_HEADERS},
                                       "404": {"description": "No such file."},
                                       "416": {"description": "Range not satisfiable."},
                                       "503": {"description": "Republishing; resolve again."}}}},
            "/v1/devices/{device}/results": {"post": {
                "operationId": "uploadResults",
                "summary": "A device's own benchmark results: the server chooses and publishes its entries.",
                "description": "The body is a results file as `rtfq-bench run` writes it (`Content-Length` "
                               "required, at most --max-upload-bytes). Every measured row must name a candidate "
                               "by its sha256. Needs a token of --device-token-file bound to this device.",
                "parameters": [_DEVICE, {
                    "name": "budget", "in": "query", "required": False,
                    "description": "The device's own budgets, repeatable, added to the server's --budget ones.",
                    "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": _json("The choices and the device's new entries.", "UploadAnswer"),
                    "400": _json("A malformed device name or budget, or no budget at all.", "Error"),
                    "403": _json("The token belongs to another device, or the server takes no uploads.", "Error"),
                    "411": _json("No Content-Length.", "Error"),
                    "413": _json("The body or its rows exceed the server's bounds.", "Error"),
                    "422": _json("Not a valid results file, or a row that is not a candidate.", "Error"),
                    "429": _json("The device uploaded too recently.", "Error", _RETRY)}}},
            "/v1/candidates": {"get": {
                "operationId": "listCandidates", "summary": "The subnets devices may download and measure.",
                "parameters": [_RUNTIME_QUERY],
                "responses": {"200": _json("The candidates, by file name.", "CandidateList"),
                              "400": _json("An unknown runtime.", "Error"),
                              "404": _json("The server offers no candidates.", "Error")}}},
            "/v1/candidates/{file}": {"get": {
                "operationId": "downloadCandidate", "parameters": [_FILE_NAME],
                "summary": "A candidate file; conditional (If-None-Match) and resumable (Range), as /v1/files.",
                "responses": {
                    "200": {"description": "The whole file.", "headers": _FILE_HEADERS, "content": _BINARY},
                    "206": {"description": "The requested byte range.",
                            "headers": {**_FILE_HEADERS, "Content-Range": _header("bytes a-b/size")},
                            "content": _BINARY},
                    "304": {"description": "If-None-Match named this file's ETag.", "headers": _FILE_HEADERS},
                    "404": _json("No such candidate.", "Error"),
                    "416": _json("The range starts beyond the end of the file.", "Error"),
                    "503": _json("The file changed on disk since it was verified; list again.", "Error", _RETRY)}}},
            "/v1/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                         "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                                               "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        }),
        "components": {"schemas": _SCHEMAS, "securitySchemes": _SECURITY_SCHEMES},
    }
