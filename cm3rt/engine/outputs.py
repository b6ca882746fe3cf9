"""A finished request's :class:`RequestOutput`: samples decoded by the processor (text runs
and images, every image of the request in one decoder batch) and best-of-n ranked by the
request's scorer (or the engine's)."""

from __future__ import annotations

from collections.abc import Callable

from cm3rt.engine.request import RequestOutput, SampleOutput
from cm3rt.engine.state import RequestState
from cm3rt.tokenizer.processor import Processor

Scorer = Callable[[str, list], list]


def build_output(req: RequestState, processor: Processor | None,
                 scorer: Scorer | None) -> RequestOutput:
    """The output of ``req`` (its error, if it failed)."""
    out = RequestOutput(request_id=req.request_id, prompt_token_ids=list(req.spec.cond),
                        error=req.error, docs=req.docs)
    if req.error is not None:
        return out
    samples = [SampleOutput(index=g.index, token_ids=list(g.generated),
                            logprobs=list(g.logprobs), finish_reason=g.finish_reason or "")
               for g in req.groups]
    if processor is not None:
        decoded = processor.decode_generated([s.token_ids for s in samples],
                                             req.starts_in_image)
        for s, segments in zip(samples, decoded):
            s.segments = segments
    scorer = req.request.scorer or scorer
    if scorer is not None and len(samples) > 1:
        _rank(samples, req.prompt_text, scorer)
    out.samples = samples
    return out


def failed_output(req: RequestState, error: Exception) -> RequestOutput:
    """The output of a request that failed after it ran (e.g. its scorer raised)."""
    return RequestOutput(request_id=req.request_id, prompt_token_ids=list(req.spec.cond),
                         error=error, docs=req.docs)


def _rank(samples: list[SampleOutput], prompt_text: str, scorer: Scorer) -> None:
    """Score each sample's first image; best first (unscored samples last)."""
    firsts = [s.images[0] if s.images else None for s in samples]
    scored = [i for i, im in enumerate(firsts) if im is not None]
    if scored:
        scores = list(scorer(prompt_text, [firsts[i] for i in scored]))
        if len(scores) != len(scored):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(scored)} images")
        for i, sc in zip(scored, scores):
            samples[i].score = float(sc)
    samples.sort(key=lambda s: (s.score is None, -(s.score or 0.0), s.index))
