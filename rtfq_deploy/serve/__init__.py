"""``rtfq-serve``: per-device model files of a DIST_DIR over HTTP (Starlette on uvicorn).

``store`` keeps the verified view of DIST_DIR and follows republished manifests,
``app`` answers the API from it, ``conditional`` implements ETag and Range rules,
``auth`` checks bearer tokens, ``openapi`` describes the API, ``protocol`` bounds slow
and idle connections, and ``runner`` puts it on uvicorn (optionally with TLS).
"""
