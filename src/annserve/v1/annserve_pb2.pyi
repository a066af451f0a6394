from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_COMPACT: _ClassVar[Encoding]
    ENCODING_NATIVE: _ClassVar[Encoding]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
    COMPRESSION_LZ4: _ClassVar[Compression]
    COMPRESSION_BLOSC: _ClassVar[Compression]

class MissingGenes(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISSING_GENES_ERROR: _ClassVar[MissingGenes]
    MISSING_GENES_ZEROS: _ClassVar[MissingGenes]

class SamplerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_CHUNK: _ClassVar[SamplerKind]
    SAMPLER_WEIGHTED: _ClassVar[SamplerKind]
ENCODING_UNSPECIFIED: Encoding
ENCODING_RAW: Encoding
ENCODING_COMPACT: Encoding
ENCODING_NATIVE: Encoding
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
COMPRESSION_LZ4: Compression
COMPRESSION_BLOSC: Compression
MISSING_GENES_ERROR: MissingGenes
MISSING_GENES_ZEROS: MissingGenes
SAMPLER_CHUNK: SamplerKind
SAMPLER_WEIGHTED: SamplerKind

class EpochSize(_message.Message):
    __slots__ = ("n_rows", "n_batches")
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    N_BATCHES_FIELD_NUMBER: _ClassVar[int]
    n_rows: int
    n_batches: int
    def __init__(self, n_rows: _Optional[int] = ..., n_batches: _Optional[int] = ...) -> None: ...

class DescribeStoreRequest(_message.Message):
    __slots__ = ("store",)
    STORE_FIELD_NUMBER: _ClassVar[int]
    store: str
    def __init__(self, store: _Optional[str] = ...) -> None: ...

class ObsColumn(_message.Message):
    __slots__ = ("name", "dtype", "categories", "ordered", "categories_dtype", "nullable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    ordered: bool
    categories_dtype: str
    nullable: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., ordered: _Optional[bool] = ..., categories_dtype: _Optional[str] = ..., nullable: _Optional[bool] = ...) -> None: ...

class MatrixInfo(_message.Message):
    __slots__ = ("name", "dtype", "sparse", "n_vars")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    N_VARS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    sparse: bool
    n_vars: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., sparse: _Optional[bool] = ..., n_vars: _Optional[int] = ...) -> None: ...

class ObsmInfo(_message.Message):
    __slots__ = ("name", "dtype", "n_cols", "sparse")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    N_COLS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    n_cols: int
    sparse: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., n_cols: _Optional[int] = ..., sparse: _Optional[bool] = ...) -> None: ...

class StoreInfo(_message.Message):
    __slots__ = ("name", "n_obs", "n_vars", "var_names", "obs_columns", "x_sparse", "x_dtype", "layers", "matrices", "raw_var_names", "obsm", "obs_index_name", "fingerprint", "bulk_port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    N_OBS_FIELD_NUMBER: _ClassVar[int]
    N_VARS_FIELD_NUMBER: _ClassVar[int]
    VAR_NAMES_FIELD_NUMBER: _ClassVar[int]
    OBS_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    X_SPARSE_FIELD_NUMBER: _ClassVar[int]
    X_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MATRICES_FIELD_NUMBER: _ClassVar[int]
    RAW_VAR_NAMES_FIELD_NUMBER: _ClassVar[int]
    OBSM_FIELD_NUMBER: _ClassVar[int]
    OBS_INDEX_NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    n_obs: int
    n_vars: int
    var_names: _containers.RepeatedScalarFieldContainer[str]
    obs_columns: _containers.RepeatedCompositeFieldContainer[ObsColumn]
    x_sparse: bool
    x_dtype: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    matrices: _containers.RepeatedCompositeFieldContainer[MatrixInfo]
    raw_var_names: _containers.RepeatedScalarFieldContainer[str]
    obsm: _containers.RepeatedCompositeFieldContainer[ObsmInfo]
    obs_index_name: str
    fingerprint: str
    bulk_port: int
    def __init__(self, name: _Optional[str] = ..., n_obs: _Optional[int] = ..., n_vars: _Optional[int] = ..., var_names: _Optional[_Iterable[str]] = ..., obs_columns: _Optional[_Iterable[_Union[ObsColumn, _Mapping]]] = ..., x_sparse: _Optional[bool] = ..., x_dtype: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., matrices: _Optional[_Iterable[_Union[MatrixInfo, _Mapping]]] = ..., raw_var_names: _Optional[_Iterable[str]] = ..., obsm: _Optional[_Iterable[_Union[ObsmInfo, _Mapping]]] = ..., obs_index_name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("store", "batch_size", "chunk_size", "preload_nchunks", "shuffle", "drop_last", "seed", "epoch", "obs_keys", "return_index", "encoding", "compression", "compression_level", "layer", "var_names", "shard_index", "shard_count", "uneven_shards", "start_batch", "sampler", "balance_by", "category_weights", "num_samples", "split", "split_fractions", "split_by", "split_seed", "obsm_keys", "use_raw", "missing_genes", "value_dtype", "shm_session", "shm_held", "store_fingerprint", "earlier_worlds", "shm_shared_frames", "bulk_session")
    class CategoryWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STORE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRELOAD_NCHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OBS_KEYS_FIELD_NUMBER: _ClassVar[int]
    RETURN_INDEX_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_LEVEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VAR_NAMES_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNEVEN_SHARDS_FIELD_NUMBER: _ClassVar[int]
    START_BATCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BY_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_SEED_FIELD_NUMBER: _ClassVar[int]
    OBSM_KEYS_FIELD_NUMBER: _ClassVar[int]
    USE_RAW_FIELD_NUMBER: _ClassVar[int]
    MISSING_GENES_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHM_SESSION_FIELD_NUMBER: _ClassVar[int]
    SHM_HELD_FIELD_NUMBER: _ClassVar[int]
    STORE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EARLIER_WORLDS_FIELD_NUMBER: _ClassVar[int]
    SHM_SHARED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BULK_SESSION_FIELD_NUMBER: _ClassVar[int]
    store: str
    batch_size: int
    chunk_size: int
    preload_nchunks: int
    shuffle: bool
    drop_last: bool
    seed: int
    epoch: int
    obs_keys: _containers.RepeatedScalarFieldContainer[str]
    return_index: bool
    encoding: Encoding
    compression: Compression
    compression_level: int
    layer: str
    var_names: _containers.RepeatedScalarFieldContainer[str]
    shard_index: int
    shard_count: int
    uneven_shards: bool
    start_batch: int
    sampler: SamplerKind
    balance_by: str
    category_weights: _containers.ScalarMap[str, float]
    num_samples: int
    split: str
    split_fractions: _containers.RepeatedScalarFieldContainer[float]
    split_by: str
    split_seed: int
    obsm_keys: _containers.RepeatedScalarFieldContainer[str]
    use_raw: bool
    missing_genes: MissingGenes
    value_dtype: str
    shm_session: bytes
    shm_held: _containers.RepeatedScalarFieldContainer[int]
    store_fingerprint: str
    earlier_worlds: _containers.RepeatedCompositeFieldContainer[EarlierWorld]
    shm_shared_frames: bool
    bulk_session: bytes
    def __init__(self, store: _Optional[str] = ..., batch_size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., preload_nchunks: _Optional[int] = ..., shuffle: _Optional[bool] = ..., drop_last: _Optional[bool] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., obs_keys: _Optional[_Iterable[str]] = ..., return_index: _Optional[bool] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., compression_level: _Optional[int] = ..., layer: _Optional[str] = ..., var_names: _Optional[_Iterable[str]] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., uneven_shards: _Optional[bool] = ..., start_batch: _Optional[int] = ..., sampler: _Optional[_Union[SamplerKind, str]] = ..., balance_by: _Optional[str] = ..., category_weights: _Optional[_Mapping[str, float]] = ..., num_samples: _Optional[int] = ..., split: _Optional[str] = ..., split_fractions: _Optional[_Iterable[float]] = ..., split_by: _Optional[str] = ..., split_seed: _Optional[int] = ..., obsm_keys: _Optional[_Iterable[str]] = ..., use_raw: _Optional[bool] = ..., missing_genes: _Optional[_Union[MissingGenes, str]] = ..., value_dtype: _Optional[str] = ..., shm_session: _Optional[bytes] = ..., shm_held: _Optional[_Iterable[int]] = ..., store_fingerprint: _Optional[str] = ..., earlier_worlds: _Optional[_Iterable[_Union[EarlierWorld, _Mapping]]] = ..., shm_shared_frames: _Optional[bool] = ..., bulk_session: _Optional[bytes] = ...) -> None: ...

class EarlierWorld(_message.Message):
    __slots__ = ("shard_count", "batches")
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    shard_count: int
    batches: int
    def __init__(self, shard_count: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class ArraySpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class StringColumn(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("batch", "batch_rows", "row_start", "n_rows", "n_vars", "sparse", "arrays", "string_obs", "compression", "payload_nbytes", "obs_names", "shm_slot", "shm_nbytes", "shm_seq", "shm_shared", "bulk_nbytes")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    N_VARS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    STRING_OBS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_NBYTES_FIELD_NUMBER: _ClassVar[int]
    OBS_NAMES_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOT_FIELD_NUMBER: _ClassVar[int]
    SHM_NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_SEQ_FIELD_NUMBER: _ClassVar[int]
    SHM_SHARED_FIELD_NUMBER: _ClassVar[int]
    BULK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    batch: int
    batch_rows: int
    row_start: int
    n_rows: int
    n_vars: int
    sparse: bool
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    string_obs: _containers.RepeatedCompositeFieldContainer[StringColumn]
    compression: Compression
    payload_nbytes: int
    obs_names: _containers.RepeatedScalarFieldContainer[str]
    shm_slot: int
    shm_nbytes: int
    shm_seq: int
    shm_shared: int
    bulk_nbytes: int
    def __init__(self, batch: _Optional[int] = ..., batch_rows: _Optional[int] = ..., row_start: _Optional[int] = ..., n_rows: _Optional[int] = ..., n_vars: _Optional[int] = ..., sparse: _Optional[bool] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., string_obs: _Optional[_Iterable[_Union[StringColumn, _Mapping]]] = ..., compression: _Optional[_Union[Compression, str]] = ..., payload_nbytes: _Optional[int] = ..., obs_names: _Optional[_Iterable[str]] = ..., shm_slot: _Optional[int] = ..., shm_nbytes: _Optional[int] = ..., shm_seq: _Optional[int] = ..., shm_shared: _Optional[int] = ..., bulk_nbytes: _Optional[int] = ...) -> None: ...

class BatchFrame(_message.Message):
    __slots__ = ("header", "payload", "padding")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    header: BatchHeader
    payload: bytes
    padding: bytes
    def __init__(self, header: _Optional[_Union[BatchHeader, _Mapping]] = ..., payload: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...
