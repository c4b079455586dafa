"""Server reflection that also resolves method names (``grpcurl describe pkg.Service.Method``).

protobuf's upb descriptor pool finds files by message, field, enum and service names but not
by method names, so grpcio-reflection alone answers NOT_FOUND for
``apikeys.v1.KeyVerifier.Verify``. A method lives in its service's file: fall back to that.
"""

from collections.abc import Iterable
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection

SERVICE_NAME: str = reflection.SERVICE_NAME


class MethodAwarePool:
    """A descriptor pool whose FindFileContainingSymbol also knows ``Service.Method`` names."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError as missing:
            try:
                method = self._pool.FindMethodByName(symbol)
            except KeyError:
                raise missing from None
            return method.containing_service.file


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    # Duck-typed: the servicer only calls Find* methods, which the wrapper delegates.
    pool = cast(descriptor_pool.DescriptorPool, MethodAwarePool(descriptor_pool.Default()))
    reflection.enable_server_reflection((*service_names, SERVICE_NAME), server, pool=pool)
