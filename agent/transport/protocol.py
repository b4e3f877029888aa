"""Protocol version and RPC names of the Gossip service (proto/dpgan/v1/dpgan.proto)."""

from __future__ import annotations

from typing import Final

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb

# 2: Announce (paced pushes); 3: incarnations, stop proposals; 4: run ids; 5: float32-delta (references)
PROTOCOL_VERSION: Final = 5

GOSSIP_SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Gossip"].full_name
PUSH_VECTOR_METHOD: Final = f"/{GOSSIP_SERVICE_NAME}/PushVector"
FETCH_STATE_METHOD: Final = f"/{GOSSIP_SERVICE_NAME}/FetchState"
