"""Stage 1 of MoCE: sequence-level clustering of the training data (paper Sec. 3.2, App. B).

Every example is turned into one request text (:mod:`.text`), embedded with a sentence
encoder (:mod:`.encode`), and clustered with k-means, k from the elbow of the SSE curve when
``num_clusters: auto`` (:mod:`.kmeans`). The result is a *cluster artifact* directory
(:mod:`.artifact`) that training and inference read through :class:`ClusterModel`.
``preprocess/cluster.py`` is a thin CLI over :mod:`.pipeline`.

Training and inference need only :class:`ClusterModel` and :func:`request_text` (the one rule
for the text of a row or a request); the rest is preprocessing.
"""

from .artifact import (
    ASSIGNMENTS_FILE,
    BY_SOURCE_PLOT,
    CENTROIDS_FILE,
    CLUSTER_MAP_PLOT,
    ELBOW_PLOT,
    FORMAT_VERSION,
    METADATA_FILE,
    REPORT_FILE,
    REQUIRED_FILES,
    ClusterModel,
    data_fingerprint,
)
from .encode import (
    DEFAULT_ENCODER,
    EmbeddingCache,
    Encoder,
    SentenceTransformerEncoder,
    embed_texts,
    encoder_signature,
    l2_normalize,
    load_sentence_transformer,
    resolve_encoder_path,
)
from .errors import ClusterArtifactError, ClusteringError
from .kmeans import (
    MINIBATCH_THRESHOLD,
    ElbowResult,
    KMeansFit,
    choose_algorithm,
    elbow_sweep,
    find_elbow,
    fit_kmeans,
    nearest_centroid,
    silhouette,
)
from .options import ClusteringOptions, resolve_num_clusters
from .pipeline import (
    RowStream,
    build_metadata,
    check_rows,
    iter_rows_from_examples,
    load_yaml_datasets,
    rows_from_examples,
    rows_from_yaml,
    run_clustering,
    write_assignments,
)
from .report import purity, report_markdown, top_keywords
from .rows import Row
from .text import (
    CHAT_KEYS,
    Request,
    check_template,
    content_key,
    iter_rows,
    request_text,
    template_fields,
    unformat_prompt,
)

__all__ = [
    "ASSIGNMENTS_FILE",
    "BY_SOURCE_PLOT",
    "CHAT_KEYS",
    "CENTROIDS_FILE",
    "CLUSTER_MAP_PLOT",
    "ClusterArtifactError",
    "ClusterModel",
    "ClusteringError",
    "ClusteringOptions",
    "DEFAULT_ENCODER",
    "ELBOW_PLOT",
    "ElbowResult",
    "EmbeddingCache",
    "Encoder",
    "FORMAT_VERSION",
    "KMeansFit",
    "METADATA_FILE",
    "MINIBATCH_THRESHOLD",
    "REPORT_FILE",
    "REQUIRED_FILES",
    "Request",
    "Row",
    "RowStream",
    "SentenceTransformerEncoder",
    "build_metadata",
    "check_rows",
    "check_template",
    "choose_algorithm",
    "content_key",
    "data_fingerprint",
    "elbow_sweep",
    "embed_texts",
    "encoder_signature",
    "find_elbow",
    "fit_kmeans",
    "iter_rows",
    "iter_rows_from_examples",
    "l2_normalize",
    "load_sentence_transformer",
    "load_yaml_datasets",
    "nearest_centroid",
    "purity",
    "report_markdown",
    "request_text",
    "resolve_encoder_path",
    "resolve_num_clusters",
    "rows_from_examples",
    "rows_from_yaml",
    "run_clustering",
    "silhouette",
    "template_fields",
    "top_keywords",
    "unformat_prompt",
    "write_assignments",
]
