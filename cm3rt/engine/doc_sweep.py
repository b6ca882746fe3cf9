"""Document sweeps (``Request.doc_sweep``): caption with 0, 1, ..., k retrieved documents and
keep what the retriever's CLIP says fits the image.

A retrieved document helps a caption when it shows what the model never learnt to name (a
concept only the memory bank holds) and hurts when it shows something close but different,
which the model then copies. Which case holds is not known before captioning, but the
candidates can be compared afterwards: the bank's CLIP scores each caption against the image,
as CM3Leon reranks sampled images with CLIP. The engine runs the k + 1 candidate requests as
ordinary requests, batched with everything else; their token events are not reported (only
the chosen captions are the request's output), and when the last one finishes the sweep's
output is built from the ``params.n`` best-scored samples of all candidates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cm3rt.engine.request import Request, RequestOutput, SampleOutput, TokenEvent


@dataclass
class _Sweep:
    request: Request
    candidates: list[str]  # candidate request ids; candidate j retrieves j documents
    outputs: dict[str, RequestOutput] = field(default_factory=dict)


class DocSweeps:
    """The engine's sweeps in flight: which candidate requests belong to which sweep."""

    def __init__(self) -> None:
        self._sweeps: dict[str, _Sweep] = {}
        self._parent: dict[str, str] = {}  # candidate id -> sweep id

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._sweeps

    def ids(self) -> list[str]:
        return list(self._sweeps)

    def is_candidate(self, request_id: str) -> bool:
        return request_id in self._parent

    @staticmethod
    def candidates_of(request: Request, request_id: str) -> list[Request]:
        """The candidate requests of a sweep: the same request with 0..k_docs documents."""
        return [dataclasses.replace(request, k_docs=k, bank=request.bank if k else None,
                                    doc_sweep=False, request_id=f"{request_id}/docs={k}")
                for k in range(request.k_docs + 1)]

    def start(self, request: Request, request_id: str, candidate_ids: list[str]) -> None:
        self._sweeps[request_id] = _Sweep(request, list(candidate_ids))
        for c in candidate_ids:
            self._parent[c] = request_id

    def unfinished_candidates(self, request_id: str) -> list[str]:
        sweep = self._sweeps[request_id]
        return [c for c in sweep.candidates if c not in sweep.outputs]

    def collect(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """``events`` without the candidates' tokens; a candidate's final output is kept,
        and a sweep whose last candidate finished gets its own final event."""
        if not self._parent:
            return events
        kept: list[TokenEvent] = []
        for ev in events:
            parent = self._parent.get(ev.request_id)
            if parent is None:
                kept.append(ev)
            elif ev.output is not None:
                done = self.record(ev.output)
                if done is not None:
                    kept.append(TokenEvent(parent, -1, -1, 0.0, output=done))
        return kept

    def record(self, output: RequestOutput) -> RequestOutput | None:
        """Keep a candidate's output; -> the sweep's output once all its candidates are in."""
        parent = self._parent.pop(output.request_id)
        sweep = self._sweeps[parent]
        sweep.outputs[output.request_id] = output
        if len(sweep.outputs) < len(sweep.candidates):
            return None
        del self._sweeps[parent]
        return _merge(parent, sweep)


def _merge(request_id: str, sweep: _Sweep) -> RequestOutput:
    """The sweep's output: the n captions scored best against the image, best first; its
    prompt ids and documents are those of the best caption's candidate."""
    outs = [sweep.outputs[c] for c in sweep.candidates]
    failed = next((o for o in outs if o.error is not None), None)
    if failed is not None:
        return RequestOutput(request_id=request_id, prompt_token_ids=failed.prompt_token_ids,
                             error=failed.error, docs=failed.docs)
    pool = [(o, s) for o in outs for s in o.samples]
    image = next(x for x in sweep.request.prompt if not isinstance(x, str))
    texts = [s.text.strip() for _, s in pool]
    scored = [i for i, t in enumerate(texts) if t]  # an empty caption is never chosen
    scores: list[float | None] = [None] * len(pool)
    if scored:
        try:
            values = _score(sweep.request.bank, image, [texts[i] for i in scored])
        except Exception as exc:  # noqa: BLE001 - a failing scorer fails this request only
            return RequestOutput(request_id=request_id, prompt_token_ids=outs[0].prompt_token_ids,
                                 error=exc)
        for i, v in zip(scored, values):
            scores[i] = float(v)
    order = sorted(range(len(pool)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    best = order[:sweep.request.params.n]
    samples: list[SampleOutput] = [dataclasses.replace(pool[i][1], index=rank, score=scores[i])
                                   for rank, i in enumerate(best)]
    top = pool[best[0]][0] if best else outs[0]
    return RequestOutput(request_id=request_id, prompt_token_ids=top.prompt_token_ids,
                         samples=samples, docs=top.docs)


def _score(bank, image, texts: list[str]) -> list[float]:
    # Imported here: the engine works without faiss / open_clip unless retrieval is used.
    from cm3rt.retrieval.bank import open_cached

    if not hasattr(bank, "score_captions"):
        bank = open_cached(bank)
    values = list(bank.score_captions(image, texts))
    if len(values) != len(texts):
        raise ValueError(f"the bank's CLIP returned {len(values)} scores for {len(texts)} "
                         f"captions")
    return values
