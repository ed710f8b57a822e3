"""rootlesskit's REST API (1.1.1) on STATE/api.sock: models, a pure router, the h11
server on trio, and a small sync client for rootless-ctl."""
API_VERSION = "1.1.1"
