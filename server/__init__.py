"""The Rudder gRPC server: service, engine backends, artifact loading."""
