from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    WIRE_DTYPE_FLOAT32: _ClassVar[WireDtype]
    WIRE_DTYPE_BFLOAT16: _ClassVar[WireDtype]
    WIRE_DTYPE_FLOAT16: _ClassVar[WireDtype]
    WIRE_DTYPE_INT8_BLOCKS: _ClassVar[WireDtype]
    WIRE_DTYPE_TOPK: _ClassVar[WireDtype]
    WIRE_DTYPE_RANDK: _ClassVar[WireDtype]
    WIRE_DTYPE_FLOAT32_HUFFMAN: _ClassVar[WireDtype]
    WIRE_DTYPE_FLOAT32_DELTA: _ClassVar[WireDtype]

class PushStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_STATUS_UNSPECIFIED: _ClassVar[PushStatus]
    PUSH_STATUS_ACCEPTED: _ClassVar[PushStatus]
    PUSH_STATUS_BUFFERED_AHEAD: _ClassVar[PushStatus]
    PUSH_STATUS_STALE: _ClassVar[PushStatus]
    PUSH_STATUS_DUPLICATE: _ClassVar[PushStatus]
    PUSH_STATUS_TOO_FAR_AHEAD: _ClassVar[PushStatus]
    PUSH_STATUS_NOT_HANDSHAKEN: _ClassVar[PushStatus]
    PUSH_STATUS_MALFORMED: _ClassVar[PushStatus]
    PUSH_STATUS_EPOCH_MISMATCH: _ClassVar[PushStatus]
    PUSH_STATUS_FORBIDDEN: _ClassVar[PushStatus]
    PUSH_STATUS_REFERENCE_MISSING: _ClassVar[PushStatus]
WIRE_DTYPE_UNSPECIFIED: WireDtype
WIRE_DTYPE_FLOAT32: WireDtype
WIRE_DTYPE_BFLOAT16: WireDtype
WIRE_DTYPE_FLOAT16: WireDtype
WIRE_DTYPE_INT8_BLOCKS: WireDtype
WIRE_DTYPE_TOPK: WireDtype
WIRE_DTYPE_RANDK: WireDtype
WIRE_DTYPE_FLOAT32_HUFFMAN: WireDtype
WIRE_DTYPE_FLOAT32_DELTA: WireDtype
PUSH_STATUS_UNSPECIFIED: PushStatus
PUSH_STATUS_ACCEPTED: PushStatus
PUSH_STATUS_BUFFERED_AHEAD: PushStatus
PUSH_STATUS_STALE: PushStatus
PUSH_STATUS_DUPLICATE: PushStatus
PUSH_STATUS_TOO_FAR_AHEAD: PushStatus
PUSH_STATUS_NOT_HANDSHAKEN: PushStatus
PUSH_STATUS_MALFORMED: PushStatus
PUSH_STATUS_EPOCH_MISMATCH: PushStatus
PUSH_STATUS_FORBIDDEN: PushStatus
PUSH_STATUS_REFERENCE_MISSING: PushStatus

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "node_id", "advertise_address", "schema_hash", "config_hash", "config_json", "membership_epoch", "agent_version", "status", "instance_id", "run_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    advertise_address: str
    schema_hash: str
    config_hash: str
    config_json: str
    membership_epoch: int
    agent_version: str
    status: PeerStatus
    instance_id: str
    run_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., advertise_address: _Optional[str] = ..., schema_hash: _Optional[str] = ..., config_hash: _Optional[str] = ..., config_json: _Optional[str] = ..., membership_epoch: _Optional[int] = ..., agent_version: _Optional[str] = ..., status: _Optional[_Union[PeerStatus, _Mapping]] = ..., instance_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("ready", "ready_from_iteration", "training", "iteration", "view_period", "members", "stop_at_iteration", "paused")
    READY_FIELD_NUMBER: _ClassVar[int]
    READY_FROM_ITERATION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    VIEW_PERIOD_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_ITERATION_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    ready_from_iteration: int
    training: bool
    iteration: int
    view_period: int
    members: _containers.RepeatedScalarFieldContainer[str]
    stop_at_iteration: int
    paused: bool
    def __init__(self, ready: _Optional[bool] = ..., ready_from_iteration: _Optional[int] = ..., training: _Optional[bool] = ..., iteration: _Optional[int] = ..., view_period: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., stop_at_iteration: _Optional[int] = ..., paused: _Optional[bool] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("accepted", "reason", "node_id", "protocol_version", "schema_hash", "config_hash", "config_json", "membership_epoch", "agent_version", "status", "instance_id", "run_id", "data_port")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    node_id: str
    protocol_version: int
    schema_hash: str
    config_hash: str
    config_json: str
    membership_epoch: int
    agent_version: str
    status: PeerStatus
    instance_id: str
    run_id: str
    data_port: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., node_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., schema_hash: _Optional[str] = ..., config_hash: _Optional[str] = ..., config_json: _Optional[str] = ..., membership_epoch: _Optional[int] = ..., agent_version: _Optional[str] = ..., status: _Optional[_Union[PeerStatus, _Mapping]] = ..., instance_id: _Optional[str] = ..., run_id: _Optional[str] = ..., data_port: _Optional[int] = ...) -> None: ...

class VectorHeader(_message.Message):
    __slots__ = ("sender_id", "iteration", "round", "membership_epoch", "dtype", "element_count", "checksum", "chunk_bytes", "name", "shape", "edge", "coded_bytes", "reference", "keep_reference")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    CODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    KEEP_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    iteration: int
    round: int
    membership_epoch: int
    dtype: WireDtype
    element_count: int
    checksum: int
    chunk_bytes: int
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    edge: EdgeCopy
    coded_bytes: int
    reference: DeltaReference
    keep_reference: bool
    def __init__(self, sender_id: _Optional[str] = ..., iteration: _Optional[int] = ..., round: _Optional[int] = ..., membership_epoch: _Optional[int] = ..., dtype: _Optional[_Union[WireDtype, str]] = ..., element_count: _Optional[int] = ..., checksum: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., edge: _Optional[_Union[EdgeCopy, _Mapping]] = ..., coded_bytes: _Optional[int] = ..., reference: _Optional[_Union[DeltaReference, _Mapping]] = ..., keep_reference: _Optional[bool] = ...) -> None: ...

class DeltaReference(_message.Message):
    __slots__ = ("iteration", "round", "checksum")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    round: int
    checksum: int
    def __init__(self, iteration: _Optional[int] = ..., round: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class EdgeCopy(_message.Message):
    __slots__ = ("reset", "base", "seen", "kept", "seed", "block")
    RESET_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    base: int
    seen: int
    kept: int
    seed: int
    block: int
    def __init__(self, reset: _Optional[bool] = ..., base: _Optional[int] = ..., seen: _Optional[int] = ..., kept: _Optional[int] = ..., seed: _Optional[int] = ..., block: _Optional[int] = ...) -> None: ...

class VectorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: VectorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[VectorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("accepted", "reason", "status")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    status: PushStatus
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., status: _Optional[_Union[PushStatus, str]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("requester_id", "names", "chunk_bytes")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    requester_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    chunk_bytes: int
    def __init__(self, requester_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class RoundAnnouncement(_message.Message):
    __slots__ = ("sender_id", "iteration", "round", "membership_epoch")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EPOCH_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    iteration: int
    round: int
    membership_epoch: int
    def __init__(self, sender_id: _Optional[str] = ..., iteration: _Optional[int] = ..., round: _Optional[int] = ..., membership_epoch: _Optional[int] = ...) -> None: ...

class AnnounceAck(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
