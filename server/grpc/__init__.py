"""The gRPC front over the transport-free core (server/instance_search.py): the server and its interceptors
(app, call slots, security, metrics), the servicer that translates each RPC into core calls, and the one
module of conversions between inserve.v1 messages and core types (messages.py)."""
