"""The data plane every front end shares (gRPC on either transport, HTTP/REST).

A front end converts its wire messages to the calls of `DataPlane` and converts the results and
`PipeserveError`s back; nothing here knows about grpc, HTTP or protobuf wire details.
"""
