"""Cosine nearest neighbours of embeddings: the k most similar rows of a query, groups of near-duplicates and
outliers. Exact: normalised vectors, matrix products in chunks (bounded memory, whatever the number of rows),
on a GPU when there is one; FAISS's exact inner-product index instead when it is installed (the same results).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SimmimError

CHUNK_ELEMENTS = 1 << 25  # similarities held at once: 128 MB of float32
MAX_DUPLICATE_PAIRS = 20_000_000  # above this the threshold is too low to mean "duplicate"


def normalised(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (float32): their dot products are cosine similarities."""
    return F.normalize(vectors.float(), dim=1)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def use_faiss(backend: str) -> bool:
    """``auto`` takes FAISS when it is installed; ``faiss`` insists on it."""
    if backend == "faiss" and not faiss_available():
        raise SimmimError('--backend faiss needs FAISS: pip install "simmim-cli[faiss]" (or faiss-gpu from conda)')
    return backend == "faiss" or (backend == "auto" and faiss_available())


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
            device: torch.device | str = "cpu", backend: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``bank`` (N, D) most cosine-similar to each query (Q, D): (similarities, indices), both
    (Q, k), most similar first. ``exclude``: for each query, a row of ``bank`` to leave out (-1: none), such as
    the query itself. Both inputs are normalised here."""
    k = min(k, len(bank) - (exclude is not None))
    if k < 1:
        return torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
    queries, bank = normalised(queries), normalised(bank)
    if use_faiss(backend):
        return _faiss_nearest(queries, bank, k, exclude)
    bank = bank.to(device)
    rows = max(1, CHUNK_ELEMENTS // max(len(bank), 1))  # queries per chunk: rows × N similarities at once
    found_similarity, found_index = [], []
    for start in range(0, len(queries), rows):
        similarity = queries[start:start + rows].to(device) @ bank.T  # (rows, N)
        if exclude is not None:
            skip = exclude[start:start + rows].to(device)
            mine = torch.nonzero(skip >= 0).flatten()
            similarity[mine, skip[mine]] = -float("inf")
        top = similarity.topk(k, dim=1)
        found_similarity.append(top.values.cpu())
        found_index.append(top.indices.cpu())
    return torch.cat(found_similarity), torch.cat(found_index)


def _faiss_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int,
                   exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])  # exact inner products of normalised rows: cosine similarity
    index.add(bank.contiguous().numpy())
    extra = 1 if exclude is not None else 0  # the excluded row is among the k + 1 nearest, or it does not matter
    similarity, found = index.search(queries.contiguous().numpy(), k + extra)
    similarity, found = torch.from_numpy(similarity), torch.from_numpy(found)
    if exclude is None:
        return similarity, found
    keep = found != exclude[:, None]
    # each row keeps its first k entries that are not the excluded row
    order = torch.argsort((~keep).int(), dim=1, stable=True)[:, :k]
    return similarity.gather(1, order), found.gather(1, order)


def all_nearest(vectors: torch.Tensor, k: int, device: torch.device | str = "cpu",
                backend: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's ``k`` nearest other rows: (similarities, indices), each (N, k)."""
    return nearest(vectors, vectors, k, torch.arange(len(vectors)), device, backend)


def outliers(vectors: torch.Tensor, count: int, k: int, device: torch.device | str = "cpu",
             backend: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` rows least similar to their neighbours: (row indices, their mean cosine similarity to their
    ``k`` nearest other rows), least similar first."""
    similarity, _ = all_nearest(vectors, k, device, backend)
    score = similarity.mean(dim=1)
    order = torch.argsort(score)[:count]
    return order, score[order]


def duplicate_groups(vectors: torch.Tensor, threshold: float, device: torch.device | str = "cpu") -> list[list[int]]:
    """Groups of rows connected by cosine similarity >= ``threshold`` (connected components: a chain of close
    pairs makes one group), each sorted, largest groups first; rows without such a neighbour are in none."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    bank = normalised(vectors).to(device)
    count = len(bank)
    rows = max(1, CHUNK_ELEMENTS // max(count, 1))
    firsts, seconds = [], []
    pairs = 0
    for start in range(0, count, rows):
        similarity = bank[start:start + rows] @ bank.T  # (rows, N)
        similarity.triu_(diagonal=start + 1)  # each pair once: only the columns after the row's own
        # a float32 cosine of identical vectors may fall a hair short of 1: --duplicates 1 still finds copies
        first, second = torch.nonzero(similarity >= threshold - 1e-6, as_tuple=True)
        pairs += len(first)
        if pairs > MAX_DUPLICATE_PAIRS:
            raise SimmimError(f"more than {MAX_DUPLICATE_PAIRS:,} pairs of images are at least {threshold} similar: "
                              "that is no longer duplicates; raise --duplicates (e.g. 0.95 or more)")
        firsts.append((first + start).cpu())
        seconds.append(second.cpu())
    first = torch.cat(firsts).numpy() if firsts else np.empty(0, np.int64)
    second = torch.cat(seconds).numpy() if seconds else np.empty(0, np.int64)
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    linked = np.zeros(count, bool)
    linked[first], linked[second] = True, True
    groups: dict[int, list[int]] = {}
    for row in np.flatnonzero(linked):
        groups.setdefault(int(component[row]), []).append(int(row))
    return sorted(groups.values(), key=lambda group: (-len(group), group[0]))
