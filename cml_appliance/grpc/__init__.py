"""gRPC for in-cluster calls: the server with mutual TLS, workloads' certificates, the .proto and its generated code."""
