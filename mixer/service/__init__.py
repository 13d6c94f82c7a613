"""The mixer as an HTTP service (``cpt mix serve``) and its client (docs/service.md).

Modules, one job each:

* :mod:`moe_cpt.mixer.service.server`: HTTP plumbing (connections, handler, streaming) and the serve loop
* :mod:`moe_cpt.mixer.service.protocol`: request/response shapes and their validation (HTTP status codes)
* :mod:`moe_cpt.mixer.service.wire`: the binary frame format of the sample streams
* :mod:`moe_cpt.mixer.service.metrics`: the Prometheus counters behind ``GET /metrics``
* :mod:`moe_cpt.mixer.service.record`: the service's run record in the store catalog (no HTTP)
* :mod:`moe_cpt.mixer.service.client`: ``ServiceMixedDataset``, the torch dataset that streams from it

Nothing is imported here, so that the client does not load the server.
"""
