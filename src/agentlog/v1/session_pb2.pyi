import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReadDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    READ_DIRECTION_UNSPECIFIED: _ClassVar[ReadDirection]
    READ_DIRECTION_FORWARDS: _ClassVar[ReadDirection]
    READ_DIRECTION_BACKWARDS: _ClassVar[ReadDirection]

class ModelStopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STOP_REASON_UNSPECIFIED: _ClassVar[ModelStopReason]
    MODEL_STOP_REASON_END_TURN: _ClassVar[ModelStopReason]
    MODEL_STOP_REASON_TOOL_USE: _ClassVar[ModelStopReason]
    MODEL_STOP_REASON_NEEDS_USER: _ClassVar[ModelStopReason]
    MODEL_STOP_REASON_MAX_TOKENS: _ClassVar[ModelStopReason]
    MODEL_STOP_REASON_SAFETY: _ClassVar[ModelStopReason]
    MODEL_STOP_REASON_UNKNOWN: _ClassVar[ModelStopReason]

class RunStopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STOP_REASON_UNSPECIFIED: _ClassVar[RunStopReason]
    RUN_STOP_REASON_COMPLETED: _ClassVar[RunStopReason]
    RUN_STOP_REASON_NEEDS_USER: _ClassVar[RunStopReason]
    RUN_STOP_REASON_BLOCKED_BY_POLICY: _ClassVar[RunStopReason]
    RUN_STOP_REASON_BUDGET_EXCEEDED: _ClassVar[RunStopReason]
    RUN_STOP_REASON_CANCELLED: _ClassVar[RunStopReason]
    RUN_STOP_REASON_ERROR: _ClassVar[RunStopReason]

class StatePatchFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_PATCH_FORMAT_UNSPECIFIED: _ClassVar[StatePatchFormat]
    STATE_PATCH_FORMAT_JSON_PATCH: _ClassVar[StatePatchFormat]
    STATE_PATCH_FORMAT_MERGE_PATCH: _ClassVar[StatePatchFormat]

class StatePatchSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_PATCH_SOURCE_UNSPECIFIED: _ClassVar[StatePatchSource]
    STATE_PATCH_SOURCE_MODEL: _ClassVar[StatePatchSource]
    STATE_PATCH_SOURCE_TOOL: _ClassVar[StatePatchSource]
    STATE_PATCH_SOURCE_SYSTEM: _ClassVar[StatePatchSource]
READ_DIRECTION_UNSPECIFIED: ReadDirection
READ_DIRECTION_FORWARDS: ReadDirection
READ_DIRECTION_BACKWARDS: ReadDirection
MODEL_STOP_REASON_UNSPECIFIED: ModelStopReason
MODEL_STOP_REASON_END_TURN: ModelStopReason
MODEL_STOP_REASON_TOOL_USE: ModelStopReason
MODEL_STOP_REASON_NEEDS_USER: ModelStopReason
MODEL_STOP_REASON_MAX_TOKENS: ModelStopReason
MODEL_STOP_REASON_SAFETY: ModelStopReason
MODEL_STOP_REASON_UNKNOWN: ModelStopReason
RUN_STOP_REASON_UNSPECIFIED: RunStopReason
RUN_STOP_REASON_COMPLETED: RunStopReason
RUN_STOP_REASON_NEEDS_USER: RunStopReason
RUN_STOP_REASON_BLOCKED_BY_POLICY: RunStopReason
RUN_STOP_REASON_BUDGET_EXCEEDED: RunStopReason
RUN_STOP_REASON_CANCELLED: RunStopReason
RUN_STOP_REASON_ERROR: RunStopReason
STATE_PATCH_FORMAT_UNSPECIFIED: StatePatchFormat
STATE_PATCH_FORMAT_JSON_PATCH: StatePatchFormat
STATE_PATCH_FORMAT_MERGE_PATCH: StatePatchFormat
STATE_PATCH_SOURCE_UNSPECIFIED: StatePatchSource
STATE_PATCH_SOURCE_MODEL: StatePatchSource
STATE_PATCH_SOURCE_TOOL: StatePatchSource
STATE_PATCH_SOURCE_SYSTEM: StatePatchSource

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "parent_id", "event", "id", "expected_sequence", "omit_event", "branch_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OMIT_EVENT_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    parent_id: str
    event: AgentEvent
    id: str
    expected_sequence: int
    omit_event: bool
    branch_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., event: _Optional[_Union[AgentEvent, _Mapping]] = ..., id: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., omit_event: _Optional[bool] = ..., branch_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: EventRecord
    def __init__(self, record: _Optional[_Union[EventRecord, _Mapping]] = ...) -> None: ...

class AppendBatchRequest(_message.Message):
    __slots__ = ("session_id", "expected_sequence", "events", "omit_events", "branch_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    OMIT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_sequence: int
    events: _containers.RepeatedCompositeFieldContainer[BatchEvent]
    omit_events: bool
    branch_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., expected_sequence: _Optional[int] = ..., events: _Optional[_Iterable[_Union[BatchEvent, _Mapping]]] = ..., omit_events: _Optional[bool] = ..., branch_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BatchEvent(_message.Message):
    __slots__ = ("id", "parent_id", "event")
    ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    parent_id: str
    event: AgentEvent
    def __init__(self, id: _Optional[str] = ..., parent_id: _Optional[str] = ..., event: _Optional[_Union[AgentEvent, _Mapping]] = ...) -> None: ...

class AppendBatchResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EventRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EventRecord, _Mapping]]] = ...) -> None: ...

class AppendStreamRequest(_message.Message):
    __slots__ = ("appends",)
    APPENDS_FIELD_NUMBER: _ClassVar[int]
    appends: _containers.RepeatedCompositeFieldContainer[AppendRequest]
    def __init__(self, appends: _Optional[_Iterable[_Union[AppendRequest, _Mapping]]] = ...) -> None: ...

class AppendStreamResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EventRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EventRecord, _Mapping]]] = ...) -> None: ...

class LoadSessionRequest(_message.Message):
    __slots__ = ("session_id", "from_sequence", "limit", "direction", "branch_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_sequence: int
    limit: int
    direction: ReadDirection
    branch_id: str
    def __init__(self, session_id: _Optional[str] = ..., from_sequence: _Optional[int] = ..., limit: _Optional[int] = ..., direction: _Optional[_Union[ReadDirection, str]] = ..., branch_id: _Optional[str] = ...) -> None: ...

class LoadSessionResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EventRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EventRecord, _Mapping]]] = ...) -> None: ...

class LoadChildrenRequest(_message.Message):
    __slots__ = ("parent_id",)
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    def __init__(self, parent_id: _Optional[str] = ...) -> None: ...

class LoadChildrenResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EventRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EventRecord, _Mapping]]] = ...) -> None: ...

class HeadRequest(_message.Message):
    __slots__ = ("session_id", "branch_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    branch_id: str
    def __init__(self, session_id: _Optional[str] = ..., branch_id: _Optional[str] = ...) -> None: ...

class HeadResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: EventRecord
    def __init__(self, record: _Optional[_Union[EventRecord, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "labels", "session_id_prefix", "updated_after", "updated_before")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    labels: _containers.ScalarMap[str, str]
    session_id_prefix: str
    updated_after: _timestamp_pb2.Timestamp
    updated_before: _timestamp_pb2.Timestamp
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., session_id_prefix: _Optional[str] = ..., updated_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "event_count", "first_timestamp", "last_timestamp", "head_id", "branches", "labels", "labels_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    LAST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    event_count: int
    first_timestamp: _timestamp_pb2.Timestamp
    last_timestamp: _timestamp_pb2.Timestamp
    head_id: str
    branches: _containers.RepeatedCompositeFieldContainer[BranchInfo]
    labels: _containers.ScalarMap[str, str]
    labels_version: int
    def __init__(self, session_id: _Optional[str] = ..., event_count: _Optional[int] = ..., first_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., head_id: _Optional[str] = ..., branches: _Optional[_Iterable[_Union[BranchInfo, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., labels_version: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id", "branch_id", "all_branches", "expected_sequence")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    branch_id: str
    all_branches: bool
    expected_sequence: int
    def __init__(self, session_id: _Optional[str] = ..., branch_id: _Optional[str] = ..., all_branches: _Optional[bool] = ..., expected_sequence: _Optional[int] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[SessionDeleted]
    def __init__(self, deleted: _Optional[_Iterable[_Union[SessionDeleted, _Mapping]]] = ...) -> None: ...

class SessionDeleted(_message.Message):
    __slots__ = ("position", "session_id", "branch_id", "last_sequence", "timestamp")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    position: int
    session_id: str
    branch_id: str
    last_sequence: int
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, position: _Optional[int] = ..., session_id: _Optional[str] = ..., branch_id: _Optional[str] = ..., last_sequence: _Optional[int] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UpdateSessionLabelsRequest(_message.Message):
    __slots__ = ("session_id", "set", "remove", "expected_version")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    set: _containers.ScalarMap[str, str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    expected_version: int
    def __init__(self, session_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove: _Optional[_Iterable[str]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class UpdateSessionLabelsResponse(_message.Message):
    __slots__ = ("labels", "version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    version: int
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ...) -> None: ...

class BranchInfo(_message.Message):
    __slots__ = ("branch_id", "event_count", "first_timestamp", "last_timestamp", "head_id", "forked_from")
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    LAST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    FORKED_FROM_FIELD_NUMBER: _ClassVar[int]
    branch_id: str
    event_count: int
    first_timestamp: _timestamp_pb2.Timestamp
    last_timestamp: _timestamp_pb2.Timestamp
    head_id: str
    forked_from: ForkedFrom
    def __init__(self, branch_id: _Optional[str] = ..., event_count: _Optional[int] = ..., first_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., head_id: _Optional[str] = ..., forked_from: _Optional[_Union[ForkedFrom, _Mapping]] = ...) -> None: ...

class ForkedFrom(_message.Message):
    __slots__ = ("session_id", "branch_id", "sequence")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    branch_id: str
    sequence: int
    def __init__(self, session_id: _Optional[str] = ..., branch_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "branch_id", "up_to_sequence", "expected_sequence", "new_branch_id", "new_session_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    UP_TO_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NEW_BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    branch_id: str
    up_to_sequence: int
    expected_sequence: int
    new_branch_id: str
    new_session_id: str
    def __init__(self, session_id: _Optional[str] = ..., branch_id: _Optional[str] = ..., up_to_sequence: _Optional[int] = ..., expected_sequence: _Optional[int] = ..., new_branch_id: _Optional[str] = ..., new_session_id: _Optional[str] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session_id", "branch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    branch: BranchInfo
    def __init__(self, session_id: _Optional[str] = ..., branch: _Optional[_Union[BranchInfo, _Mapping]] = ...) -> None: ...

class EventRecord(_message.Message):
    __slots__ = ("id", "session_id", "parent_id", "timestamp", "event", "sequence", "branch_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    session_id: str
    parent_id: str
    timestamp: _timestamp_pb2.Timestamp
    event: AgentEvent
    sequence: int
    branch_id: str
    def __init__(self, id: _Optional[str] = ..., session_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event: _Optional[_Union[AgentEvent, _Mapping]] = ..., sequence: _Optional[int] = ..., branch_id: _Optional[str] = ...) -> None: ...

class SubscribeSessionRequest(_message.Message):
    __slots__ = ("session_id", "from_sequence", "branch_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_sequence: int
    branch_id: str
    def __init__(self, session_id: _Optional[str] = ..., from_sequence: _Optional[int] = ..., branch_id: _Optional[str] = ...) -> None: ...

class SubscribeSessionResponse(_message.Message):
    __slots__ = ("records", "caught_up")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    records: RecordBatch
    caught_up: CaughtUp
    def __init__(self, records: _Optional[_Union[RecordBatch, _Mapping]] = ..., caught_up: _Optional[_Union[CaughtUp, _Mapping]] = ...) -> None: ...

class RecordBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EventRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EventRecord, _Mapping]]] = ...) -> None: ...

class CaughtUp(_message.Message):
    __slots__ = ("sequence", "position")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    position: int
    def __init__(self, sequence: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class SubscribeAllRequest(_message.Message):
    __slots__ = ("from_position", "session_id_prefix", "part_types", "branch_id")
    FROM_POSITION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PART_TYPES_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    from_position: int
    session_id_prefix: str
    part_types: _containers.RepeatedScalarFieldContainer[str]
    branch_id: str
    def __init__(self, from_position: _Optional[int] = ..., session_id_prefix: _Optional[str] = ..., part_types: _Optional[_Iterable[str]] = ..., branch_id: _Optional[str] = ...) -> None: ...

class SubscribeAllResponse(_message.Message):
    __slots__ = ("records", "caught_up", "gap", "checkpoint", "deleted")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    records: FeedBatch
    caught_up: CaughtUp
    gap: FeedGap
    checkpoint: Checkpoint
    deleted: SessionDeleted
    def __init__(self, records: _Optional[_Union[FeedBatch, _Mapping]] = ..., caught_up: _Optional[_Union[CaughtUp, _Mapping]] = ..., gap: _Optional[_Union[FeedGap, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., deleted: _Optional[_Union[SessionDeleted, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class FeedGap(_message.Message):
    __slots__ = ("first_position", "last_position", "session_id", "reason", "message", "branch_id")
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    first_position: int
    last_position: int
    session_id: str
    reason: str
    message: str
    branch_id: str
    def __init__(self, first_position: _Optional[int] = ..., last_position: _Optional[int] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., branch_id: _Optional[str] = ...) -> None: ...

class FeedBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[FeedRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[FeedRecord, _Mapping]]] = ...) -> None: ...

class FeedRecord(_message.Message):
    __slots__ = ("position", "record")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    position: int
    record: EventRecord
    def __init__(self, position: _Optional[int] = ..., record: _Optional[_Union[EventRecord, _Mapping]] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("run_started", "iteration_started", "model_output", "text_delta", "tool_call_requested", "tool_call_completed", "tool_call_failed", "state_patched", "context_compacted", "approval_requested", "approval_resolved", "run_errored", "run_finished")
    RUN_STARTED_FIELD_NUMBER: _ClassVar[int]
    ITERATION_STARTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FAILED_FIELD_NUMBER: _ClassVar[int]
    STATE_PATCHED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_COMPACTED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    RUN_ERRORED_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    run_started: RunStarted
    iteration_started: IterationStarted
    model_output: ModelOutput
    text_delta: TextDelta
    tool_call_requested: ToolCallRequested
    tool_call_completed: ToolCallCompleted
    tool_call_failed: ToolCallFailed
    state_patched: StatePatched
    context_compacted: ContextCompacted
    approval_requested: ApprovalRequested
    approval_resolved: ApprovalResolved
    run_errored: RunErrored
    run_finished: RunFinished
    def __init__(self, run_started: _Optional[_Union[RunStarted, _Mapping]] = ..., iteration_started: _Optional[_Union[IterationStarted, _Mapping]] = ..., model_output: _Optional[_Union[ModelOutput, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call_requested: _Optional[_Union[ToolCallRequested, _Mapping]] = ..., tool_call_completed: _Optional[_Union[ToolCallCompleted, _Mapping]] = ..., tool_call_failed: _Optional[_Union[ToolCallFailed, _Mapping]] = ..., state_patched: _Optional[_Union[StatePatched, _Mapping]] = ..., context_compacted: _Optional[_Union[ContextCompacted, _Mapping]] = ..., approval_requested: _Optional[_Union[ApprovalRequested, _Mapping]] = ..., approval_resolved: _Optional[_Union[ApprovalResolved, _Mapping]] = ..., run_errored: _Optional[_Union[RunErrored, _Mapping]] = ..., run_finished: _Optional[_Union[RunFinished, _Mapping]] = ...) -> None: ...

class JsonValue(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("run_id", "session_id", "provider", "max_iterations")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    provider: str
    max_iterations: int
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., provider: _Optional[str] = ..., max_iterations: _Optional[int] = ...) -> None: ...

class IterationStarted(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ...) -> None: ...

class ModelOutput(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "stop_reason", "directive_count", "usage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_COUNT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    stop_reason: ModelStopReason
    directive_count: int
    usage: TokenUsage
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., stop_reason: _Optional[_Union[ModelStopReason, str]] = ..., directive_count: _Optional[int] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "delta")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    delta: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., delta: _Optional[str] = ...) -> None: ...

class ToolCallRequested(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "call")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    call: ToolCall
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., call: _Optional[_Union[ToolCall, _Mapping]] = ...) -> None: ...

class ToolCallCompleted(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "result")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    result: ToolResultSummary
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., result: _Optional[_Union[ToolResultSummary, _Mapping]] = ...) -> None: ...

class ToolCallFailed(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "call_id", "tool_name", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    call_id: str
    tool_name: str
    error: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class StatePatched(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "patch", "revision")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    patch: StatePatch
    revision: int
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., patch: _Optional[_Union[StatePatch, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class ContextCompacted(_message.Message):
    __slots__ = ("run_id", "session_id", "iteration", "dropped_count", "tokens_before", "tokens_after")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    DROPPED_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_AFTER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    iteration: int
    dropped_count: int
    tokens_before: int
    tokens_after: int
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., iteration: _Optional[int] = ..., dropped_count: _Optional[int] = ..., tokens_before: _Optional[int] = ..., tokens_after: _Optional[int] = ...) -> None: ...

class ApprovalRequested(_message.Message):
    __slots__ = ("run_id", "session_id", "approval_id", "call_id", "tool_name", "arguments", "risk")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    approval_id: str
    call_id: str
    tool_name: str
    arguments: JsonValue
    risk: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., arguments: _Optional[_Union[JsonValue, _Mapping]] = ..., risk: _Optional[str] = ...) -> None: ...

class ApprovalResolved(_message.Message):
    __slots__ = ("run_id", "session_id", "approval_id", "decision", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    approval_id: str
    decision: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RunErrored(_message.Message):
    __slots__ = ("run_id", "session_id", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    error: str
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class RunFinished(_message.Message):
    __slots__ = ("run_id", "session_id", "reason", "total_iterations", "final_answer", "usage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    FINAL_ANSWER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session_id: str
    reason: RunStopReason
    total_iterations: int
    final_answer: str
    usage: TokenUsage
    def __init__(self, run_id: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[_Union[RunStopReason, str]] = ..., total_iterations: _Optional[int] = ..., final_answer: _Optional[str] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("call_id", "tool_name", "input")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    tool_name: str
    input: JsonValue
    def __init__(self, call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., input: _Optional[_Union[JsonValue, _Mapping]] = ...) -> None: ...

class ToolResultSummary(_message.Message):
    __slots__ = ("call_id", "tool_name", "output")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    tool_name: str
    output: JsonValue
    def __init__(self, call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., output: _Optional[_Union[JsonValue, _Mapping]] = ...) -> None: ...

class StatePatch(_message.Message):
    __slots__ = ("format", "patch", "source")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    format: StatePatchFormat
    patch: JsonValue
    source: StatePatchSource
    def __init__(self, format: _Optional[_Union[StatePatchFormat, str]] = ..., patch: _Optional[_Union[JsonValue, _Mapping]] = ..., source: _Optional[_Union[StatePatchSource, str]] = ...) -> None: ...

class TokenUsage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_creation_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., cache_creation_tokens: _Optional[int] = ...) -> None: ...
