from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    LENGTH: _ClassVar[StopReason]
    EOS: _ClassVar[StopReason]
    STOP_STRING: _ClassVar[StopReason]
    GUARD: _ClassVar[StopReason]
STOP_REASON_UNSPECIFIED: StopReason
LENGTH: StopReason
EOS: StopReason
STOP_STRING: StopReason
GUARD: StopReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_p: float
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., min_p: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class Scope(_message.Message):
    __slots__ = ("kind", "start", "end")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Scope.Kind]
        ALL: _ClassVar[Scope.Kind]
        PROMPT: _ClassVar[Scope.Kind]
        GENERATED: _ClassVar[Scope.Kind]
        RANGE: _ClassVar[Scope.Kind]
    KIND_UNSPECIFIED: Scope.Kind
    ALL: Scope.Kind
    PROMPT: Scope.Kind
    GENERATED: Scope.Kind
    RANGE: Scope.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    kind: Scope.Kind
    start: int
    end: int
    def __init__(self, kind: _Optional[_Union[Scope.Kind, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class FeatureIntervention(_message.Message):
    __slots__ = ("sae", "feature", "clamp", "add", "scale", "ablate")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    CLAMP_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ABLATE_FIELD_NUMBER: _ClassVar[int]
    sae: str
    feature: int
    clamp: float
    add: float
    scale: float
    ablate: bool
    def __init__(self, sae: _Optional[str] = ..., feature: _Optional[int] = ..., clamp: _Optional[float] = ..., add: _Optional[float] = ..., scale: _Optional[float] = ..., ablate: _Optional[bool] = ...) -> None: ...

class DirectionIntervention(_message.Message):
    __slots__ = ("site", "alpha", "sae_feature", "vector", "steering_vector")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SAE_FEATURE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    STEERING_VECTOR_FIELD_NUMBER: _ClassVar[int]
    site: str
    alpha: float
    sae_feature: SaeFeature
    vector: Vector
    steering_vector: str
    def __init__(self, site: _Optional[str] = ..., alpha: _Optional[float] = ..., sae_feature: _Optional[_Union[SaeFeature, _Mapping]] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., steering_vector: _Optional[str] = ...) -> None: ...

class SaeFeature(_message.Message):
    __slots__ = ("sae", "feature")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    sae: str
    feature: int
    def __init__(self, sae: _Optional[str] = ..., feature: _Optional[int] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class CodeIntervention(_message.Message):
    __slots__ = ("codebook", "head", "code", "strength")
    CODEBOOK_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    codebook: str
    head: int
    code: int
    strength: float
    def __init__(self, codebook: _Optional[str] = ..., head: _Optional[int] = ..., code: _Optional[int] = ..., strength: _Optional[float] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("scope", "feature", "direction", "code", "when")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    scope: Scope
    feature: FeatureIntervention
    direction: DirectionIntervention
    code: CodeIntervention
    when: Condition
    def __init__(self, scope: _Optional[_Union[Scope, _Mapping]] = ..., feature: _Optional[_Union[FeatureIntervention, _Mapping]] = ..., direction: _Optional[_Union[DirectionIntervention, _Mapping]] = ..., code: _Optional[_Union[CodeIntervention, _Mapping]] = ..., when: _Optional[_Union[Condition, _Mapping]] = ...) -> None: ...

class FeatureGate(_message.Message):
    __slots__ = ("sae", "feature", "above")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ABOVE_FIELD_NUMBER: _ClassVar[int]
    sae: str
    feature: int
    above: float
    def __init__(self, sae: _Optional[str] = ..., feature: _Optional[int] = ..., above: _Optional[float] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("gate", "tokens")
    GATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    gate: FeatureGate
    tokens: int
    def __init__(self, gate: _Optional[_Union[FeatureGate, _Mapping]] = ..., tokens: _Optional[int] = ...) -> None: ...

class ReadoutRequest(_message.Message):
    __slots__ = ("saes", "codebooks", "top_k", "feature_ids", "include_prompt")
    SAES_FIELD_NUMBER: _ClassVar[int]
    CODEBOOKS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FEATURE_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    saes: _containers.RepeatedScalarFieldContainer[str]
    codebooks: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    feature_ids: _containers.RepeatedScalarFieldContainer[int]
    include_prompt: bool
    def __init__(self, saes: _Optional[_Iterable[str]] = ..., codebooks: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., feature_ids: _Optional[_Iterable[int]] = ..., include_prompt: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "chat", "sampling", "interventions", "readouts", "include_baseline", "guards")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    READOUTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BASELINE_FIELD_NUMBER: _ClassVar[int]
    GUARDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: ChatMessages
    sampling: SamplingParams
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    readouts: ReadoutRequest
    include_baseline: bool
    guards: _containers.RepeatedCompositeFieldContainer[FeatureGate]
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., readouts: _Optional[_Union[ReadoutRequest, _Mapping]] = ..., include_baseline: _Optional[bool] = ..., guards: _Optional[_Iterable[_Union[FeatureGate, _Mapping]]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TraceRequest(_message.Message):
    __slots__ = ("prompt", "chat", "interventions", "readouts")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    READOUTS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: ChatMessages
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    readouts: ReadoutRequest
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., readouts: _Optional[_Union[ReadoutRequest, _Mapping]] = ...) -> None: ...

class FeatureValues(_message.Message):
    __slots__ = ("ids", "values")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class CodeGroup(_message.Message):
    __slots__ = ("head", "codes")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    head: int
    codes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, head: _Optional[int] = ..., codes: _Optional[_Iterable[int]] = ...) -> None: ...

class Readout(_message.Message):
    __slots__ = ("source", "top", "selected", "codes")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    source: str
    top: FeatureValues
    selected: FeatureValues
    codes: _containers.RepeatedCompositeFieldContainer[CodeGroup]
    def __init__(self, source: _Optional[str] = ..., top: _Optional[_Union[FeatureValues, _Mapping]] = ..., selected: _Optional[_Union[FeatureValues, _Mapping]] = ..., codes: _Optional[_Iterable[_Union[CodeGroup, _Mapping]]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob", "position", "is_prompt", "top_logprobs")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    IS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    position: int
    is_prompt: bool
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., position: _Optional[int] = ..., is_prompt: _Optional[bool] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GuardHit(_message.Message):
    __slots__ = ("index", "position", "value")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    index: int
    position: int
    value: float
    def __init__(self, index: _Optional[int] = ..., position: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "readouts", "baseline", "stop_reason", "usage", "guard")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    READOUTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    token: Token
    readouts: _containers.RepeatedCompositeFieldContainer[Readout]
    baseline: bool
    stop_reason: StopReason
    usage: Usage
    guard: GuardHit
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., readouts: _Optional[_Iterable[_Union[Readout, _Mapping]]] = ..., baseline: _Optional[bool] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., guard: _Optional[_Union[GuardHit, _Mapping]] = ...) -> None: ...

class TracedToken(_message.Message):
    __slots__ = ("token", "readouts")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    READOUTS_FIELD_NUMBER: _ClassVar[int]
    token: Token
    readouts: _containers.RepeatedCompositeFieldContainer[Readout]
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., readouts: _Optional[_Iterable[_Union[Readout, _Mapping]]] = ...) -> None: ...

class TraceResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TracedToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TracedToken, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaeInfo(_message.Message):
    __slots__ = ("id", "site", "d_in", "d_sae", "architecture", "has_feature_metadata", "site_out")
    ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HAS_FEATURE_METADATA_FIELD_NUMBER: _ClassVar[int]
    SITE_OUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    site: str
    d_in: int
    d_sae: int
    architecture: str
    has_feature_metadata: bool
    site_out: str
    def __init__(self, id: _Optional[str] = ..., site: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., architecture: _Optional[str] = ..., has_feature_metadata: _Optional[bool] = ..., site_out: _Optional[str] = ...) -> None: ...

class VectorInfo(_message.Message):
    __slots__ = ("name", "site", "method", "alpha", "concept", "budget", "features", "scope")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    site: str
    method: str
    alpha: float
    concept: str
    budget: float
    features: _containers.RepeatedCompositeFieldContainer[VectorFeature]
    scope: str
    def __init__(self, name: _Optional[str] = ..., site: _Optional[str] = ..., method: _Optional[str] = ..., alpha: _Optional[float] = ..., concept: _Optional[str] = ..., budget: _Optional[float] = ..., features: _Optional[_Iterable[_Union[VectorFeature, _Mapping]]] = ..., scope: _Optional[str] = ...) -> None: ...

class VectorFeature(_message.Message):
    __slots__ = ("sae", "feature", "cosine")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    sae: str
    feature: int
    cosine: float
    def __init__(self, sae: _Optional[str] = ..., feature: _Optional[int] = ..., cosine: _Optional[float] = ...) -> None: ...

class CodebookInfo(_message.Message):
    __slots__ = ("id", "site", "num_codes", "k", "num_heads", "d_code")
    ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    NUM_CODES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    D_CODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    site: str
    num_codes: int
    k: int
    num_heads: int
    d_code: int
    def __init__(self, id: _Optional[str] = ..., site: _Optional[str] = ..., num_codes: _Optional[int] = ..., k: _Optional[int] = ..., num_heads: _Optional[int] = ..., d_code: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "num_layers", "d_model", "num_heads", "vocab_size", "backend", "sites", "saes", "codebooks", "vectors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    SAES_FIELD_NUMBER: _ClassVar[int]
    CODEBOOKS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    num_layers: int
    d_model: int
    num_heads: int
    vocab_size: int
    backend: str
    sites: _containers.RepeatedScalarFieldContainer[str]
    saes: _containers.RepeatedCompositeFieldContainer[SaeInfo]
    codebooks: _containers.RepeatedCompositeFieldContainer[CodebookInfo]
    vectors: _containers.RepeatedCompositeFieldContainer[VectorInfo]
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., num_heads: _Optional[int] = ..., vocab_size: _Optional[int] = ..., backend: _Optional[str] = ..., sites: _Optional[_Iterable[str]] = ..., saes: _Optional[_Iterable[_Union[SaeInfo, _Mapping]]] = ..., codebooks: _Optional[_Iterable[_Union[CodebookInfo, _Mapping]]] = ..., vectors: _Optional[_Iterable[_Union[VectorInfo, _Mapping]]] = ...) -> None: ...

class ListFeaturesRequest(_message.Message):
    __slots__ = ("source", "label", "regex", "limit", "offset", "min_precision", "min_recall", "says")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MIN_PRECISION_FIELD_NUMBER: _ClassVar[int]
    MIN_RECALL_FIELD_NUMBER: _ClassVar[int]
    SAYS_FIELD_NUMBER: _ClassVar[int]
    source: str
    label: str
    regex: str
    limit: int
    offset: int
    min_precision: float
    min_recall: float
    says: str
    def __init__(self, source: _Optional[str] = ..., label: _Optional[str] = ..., regex: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., min_precision: _Optional[float] = ..., min_recall: _Optional[float] = ..., says: _Optional[str] = ...) -> None: ...

class FeatureSummary(_message.Message):
    __slots__ = ("id", "label", "density", "top_examples", "head", "precision", "recall", "max_activation", "output_score", "says_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    TOP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCORE_FIELD_NUMBER: _ClassVar[int]
    SAYS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    label: str
    density: float
    top_examples: _containers.RepeatedScalarFieldContainer[str]
    head: int
    precision: float
    recall: float
    max_activation: float
    output_score: float
    says_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[int] = ..., label: _Optional[str] = ..., density: _Optional[float] = ..., top_examples: _Optional[_Iterable[str]] = ..., head: _Optional[int] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., max_activation: _Optional[float] = ..., output_score: _Optional[float] = ..., says_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class ListFeaturesResponse(_message.Message):
    __slots__ = ("features", "total")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureSummary]
    total: int
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureSummary, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class LoadSaeRequest(_message.Message):
    __slots__ = ("path", "id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    id: str
    def __init__(self, path: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class LoadVectorRequest(_message.Message):
    __slots__ = ("path", "name")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class UnloadVectorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadVectorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadSaeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UnloadSaeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
