"""The gRPC layer: generated code, proto ↔ domain conversion, servicers, interceptors, server.

Only this package imports grpc and the generated protobuf code. A request flows
``interceptors`` → ``scoring`` (servicer) → ``convert`` + ``validate`` →
``riskd.engine.Scorer`` → ``convert`` back.
"""
