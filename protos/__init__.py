"""llmesh v1 gRPC API: the .proto files and their generated Python stubs.

Regenerate after editing a .proto: `python -m protos.codegen`.
"""
