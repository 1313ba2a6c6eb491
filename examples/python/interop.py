#!/usr/bin/env python3
"""Calls a running pdvault from Python: a create, a granted read and a refused read.

The stubs are generated from ../../proto at run time with grpcio-tools, so this proves the
published .proto files alone are enough for another language to talk to the vault.

With the vault running (`cargo run --release -- serve`, as the README's "Run it" says),
from the repository root, with the administrator token the vault created:

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    PDVAULT_ADDR=127.0.0.1:50051 PDVAULT_TOKEN=$(cat pdvault-data/admin.token) \
        .venv/bin/python examples/python/interop.py

Any caller allowed to create and read records will do: the granted read asks for
service-delivery, and the refused one for a purpose the vault does not define (direct
marketing, not among the privacy policy's purposes), which no caller holds, the
administrator included.

Exits 0 when every step behaves as the contract says, 1 otherwise. It prints outcomes,
never the identity values it sent or received.
"""

import importlib
import os
import pathlib
import sys
import tempfile

import grpc
import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"
PROTOS = ["pdvault/v1/vault.proto", "google/rpc/status.proto"]
# Not a purpose the vault defines, so no caller can be granted it.
UNDEFINED_PURPOSE = "direct-marketing"


def generate_stubs(out_dir: str) -> None:
    """Compiles the vault's .proto files into importable modules under out_dir."""
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_ROOT / p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # The generated modules import each other as packages (pdvault.v1.vault_pb2).
    for package in ("pdvault", "pdvault/v1"):
        (pathlib.Path(out_dir) / package / "__init__.py").touch()
    sys.path.insert(0, out_dir)


def main() -> int:
    addr = os.environ["PDVAULT_ADDR"]
    token = os.environ["PDVAULT_TOKEN"]
    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(out_dir)
        vault_pb2 = importlib.import_module("pdvault.v1.vault_pb2")
        vault_grpc = importlib.import_module("pdvault.v1.vault_pb2_grpc")
        metadata = (("authorization", f"Bearer {token}"), ("x-request-id", "python-interop"))
        with grpc.insecure_channel(addr) as channel:
            stub = vault_grpc.VaultStub(channel)
            identity = vault_pb2.Identity(
                name="周九", phone="13600001234", nationality="CHN"
            )
            record = stub.CreateRecord(
                vault_pb2.CreateRecordRequest(identity=identity, request_id="py-1"),
                metadata=metadata,
            )
            if not record.record_id.startswith("rec_"):
                print("create: unexpected record id format")
                return 1
            print("create: ok")

            granted = stub.GetRecord(
                vault_pb2.GetRecordRequest(
                    record_id=record.record_id, purpose="service-delivery"
                ),
                metadata=metadata,
            )
            name = granted.fields["name"]
            if name.value != identity.name or name.level != vault_pb2.RELEASE_LEVEL_PLAIN:
                print("granted read: wrong value or level")
                return 1
            print("granted read: ok")

            try:
                stub.GetRecord(
                    vault_pb2.GetRecordRequest(
                        record_id=record.record_id, purpose=UNDEFINED_PURPOSE
                    ),
                    metadata=metadata,
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.PERMISSION_DENIED:
                    print(f"refused read: wrong status {error.code()}")
                    return 1
                print("refused read: ok (PERMISSION_DENIED)")
            else:
                print("refused read: was released")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
