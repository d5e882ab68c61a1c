"""A TensorBoard custom-scalars layout that groups the ``gns/`` charts.

TensorBoard's "Custom Scalars" dashboard draws several tags on one chart. The layout below puts
``B_simple`` next to the batch actually used per optimizer step (the comparison the noise scale is for),
``B_simple`` with its logged interval as a band (a Margin chart),
the two unbiased estimates on another chart, and the batch sizes, accumulation and skipped steps on
their own. Only the charts a run fills are written: the arguments of :func:`gns_custom_scalars_layout`
say which optional scalars (the adaptive batch's, per-layer, per-example coverage, Kaplan's critical
batch) the run logs. Tags are regular expressions matched from the start of the tag (``re.match``); the ``$``
anchors keep ``gns/b_simple`` from also drawing ``gns/b_simple_sequences`` and the like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_gns import scalars


def _exact(tag: str) -> str:
    """A regex that matches ``tag`` and nothing longer (TensorBoard matches from the start of the tag)."""
    return re.escape(tag) + "$"


CATEGORY = "gradient noise scale"
LAYER_CATEGORY = "gradient noise scale per layer"

# Chart title -> tag regexes, for every scalar the callbacks can log. gns_custom_scalars_layout keeps the
# charts and tags a run will fill (see its arguments), so no chart sits empty in the dashboard.
CHARTS: dict[str, list[str]] = {
    "B_simple and the batch per optimizer step": [
        _exact(scalars.B_SIMPLE),
        _exact(scalars.EFFECTIVE_BATCH_SIZE),
        _exact(scalars.B_BIG),
    ],
    "|G|^2 and tr(Sigma) estimates (log scale helps)": [
        _exact(scalars.GRAD_SQ_NORM),
        _exact(scalars.TRACE_COV),
    ],
    "forecasts for the batch in use: S/S_min, E/E_min, statistical efficiency": [
        _exact(scalars.STEPS_OVER_MIN),
        _exact(scalars.EXAMPLES_OVER_MIN),
        _exact(scalars.STATISTICAL_EFFICIENCY),
    ],
    "batch sizes": [
        _exact(scalars.B_SMALL),
        _exact(scalars.B_BIG),
        _exact(scalars.EFFECTIVE_BATCH_SIZE),
    ],
    "accumulation and learning-rate factor": [
        _exact(scalars.ACCUMULATION),
        _exact(scalars.LR_FACTOR),
    ],
    "critical batch from the loss (Kaplan et al. 2020), in tokens": [
        _exact(scalars.KAPLAN_B_CRIT_TOKENS),
    ],
    "skipped steps and coverage": [
        _exact(scalars.SKIPPED_STEPS),
        _exact(scalars.COVERED_FRACTION),
    ],
}
# A Margin chart draws a value with a band between two other tags: B_simple with its logged interval.
MARGIN_CHARTS: dict[str, tuple[str, str, str]] = {
    "B_simple with one standard error (band open above while |G|^2 is within its noise)": (
        scalars.B_SIMPLE,
        scalars.B_SIMPLE_LOW,
        scalars.B_SIMPLE_HIGH,
    ),
}
LAYER_CHARTS: dict[str, list[str]] = {"B_simple per layer": [re.escape(scalars.LAYER_PREFIX) + r".*/b_simple$"]}
# Tags logged only in some configurations: AdaptiveBatchSize's, mode="per_example"'s, kaplan_loss's.
ADAPTIVE_TAGS = frozenset(
    {_exact(scalars.EFFECTIVE_BATCH_SIZE), _exact(scalars.ACCUMULATION), _exact(scalars.LR_FACTOR)}
)
PER_EXAMPLE_TAGS = frozenset({_exact(scalars.COVERED_FRACTION)})
KAPLAN_TAGS = frozenset({_exact(scalars.KAPLAN_B_CRIT_TOKENS)})


def gns_custom_scalars_layout(
    *, adaptive: bool = True, per_layer: bool = True, per_example: bool = True, kaplan: bool = True
) -> layout_pb2.Layout:
    """The custom-scalars layout proto for the ``gns/`` scalars a run logs.

    Two categories: the whole-model charts (open) and the per-layer noise scales (marked ``closed`` in the
    proto; :func:`write_layout` writes the dictionary form, which has no such flag, so TensorBoard opens it). The
    arguments say which optional scalars the run logs; a chart left without tags is left out, and so is
    a chart title's mention of them. The defaults list every chart.

    Args:
        adaptive: an ``AdaptiveBatchSize`` callback logs ``gns/effective_batch_size``, ``gns/accumulation``
            and ``gns/lr_factor``.
        per_layer: ``GradientNoiseScale(per_layer=True)`` logs ``gns/layer/<name>/b_simple``.
        per_example: ``mode="per_example"`` logs ``gns/covered_fraction``.
        kaplan: ``kaplan_loss`` is set, so ``gns/kaplan_b_crit_tokens`` is logged.

    Example:
        >>> layout = gns_custom_scalars_layout(adaptive=False, per_layer=False, per_example=False, kaplan=False)
        >>> [chart.title for chart in layout.category[0].chart]  # doctest: +NORMALIZE_WHITESPACE
        ['B_simple and the batch per optimizer step',
         'B_simple with one standard error (band open above while |G|^2 is within its noise)',
         '|G|^2 and tr(Sigma) estimates (log scale helps)',
         'forecasts for the batch in use: S/S_min, E/E_min, statistical efficiency', 'batch sizes',
         'skipped steps']
    """
    absent = (
        (set() if adaptive else ADAPTIVE_TAGS)
        | (set() if per_example else PER_EXAMPLE_TAGS)
        | (set() if kaplan else KAPLAN_TAGS)
    )
    charts: dict[str, list[str] | tuple[str, str, str]] = {}
    for title, tags in CHARTS.items():
        kept = [tag for tag in tags if tag not in absent]
        if kept:
            charts[_retitle(title, per_example)] = kept
        if title == "B_simple and the batch per optimizer step":
            charts.update(MARGIN_CHARTS)
    categories = [_category(CATEGORY, charts, closed=False)]
    if per_layer:
        categories.append(_category(LAYER_CATEGORY, LAYER_CHARTS, closed=True))
    return layout_pb2.Layout(category=categories)


def _retitle(title: str, per_example: bool) -> str:
    # The coverage part of the title names a tag that only mode="per_example" logs.
    if not per_example and title == "skipped steps and coverage":
        return "skipped steps"
    return title


def _chart(title: str, tags: list[str] | tuple[str, str, str]) -> layout_pb2.Chart:
    if isinstance(tags, tuple):  # (value, lower, upper): exact tag names, not regexes
        value, lower, upper = tags
        series = layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)
        return layout_pb2.Chart(title=title, margin=layout_pb2.MarginChartContent(series=[series]))
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=tags))


def _category(title: str, charts: Mapping[str, list[str] | tuple[str, str, str]], closed: bool) -> layout_pb2.Category:
    return layout_pb2.Category(
        title=title, closed=closed, chart=[_chart(chart, tags) for chart, tags in charts.items()]
    )


def layout_as_dict(layout: layout_pb2.Layout) -> dict[str, dict[str, list[Any]]]:
    """The layout in the ``{category: {chart: ["Multiline", [tags]]}}`` form of ``SummaryWriter.add_custom_scalars``.

    That form has no ``closed`` flag: categories written through it start open.
    """
    result: dict[str, dict[str, list[Any]]] = {}
    for category in layout.category:
        charts = result.setdefault(category.title, {})
        for chart in category.chart:
            if chart.HasField("multiline"):
                charts[chart.title] = ["Multiline", list(chart.multiline.tag)]
            else:
                margin = chart.margin.series[0]
                charts[chart.title] = ["Margin", [margin.value, margin.lower, margin.upper]]
    return result


def _is_tensorboard_logger(logger: Any) -> bool:
    # By class name through the MRO, so neither lightning.pytorch nor pytorch_lightning (nor
    # lightning.fabric) has to be imported: the logger may come from any of them.
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def write_layout(
    logger: Any, *, adaptive: bool = True, per_layer: bool = True, per_example: bool = True, kaplan: bool = True
) -> bool:
    """Write :func:`gns_custom_scalars_layout` into a TensorBoardLogger's event file.

    The keyword arguments are :func:`gns_custom_scalars_layout`'s: which optional scalars this run logs
    (all of them by default).

    Works with the ``TensorBoardLogger`` of ``lightning.pytorch``, ``pytorch_lightning`` and
    ``lightning.fabric``; on ranks other than 0 their ``experiment`` is a no-op stand-in, so calling this
    on every rank is fine. Call it once per run (``SummaryWriter.add_custom_scalars`` documents a single
    call per writer), e.g. from ``on_fit_start``.

    Returns:
        True if ``logger`` is a TensorBoard logger and the layout was handed to its writer, else False
        (other loggers are left alone: nothing to group there).
    """
    if not _is_tensorboard_logger(logger):
        return False
    experiment = logger.experiment
    # The public SummaryWriter method exists in torch.utils.tensorboard and tensorboardX alike (Lightning
    # uses either), whereas writing the raw summary proto ties it to one of them.
    layout = gns_custom_scalars_layout(adaptive=adaptive, per_layer=per_layer, per_example=per_example, kaplan=kaplan)
    experiment.add_custom_scalars(layout_as_dict(layout))
    return True


__all__ = ["gns_custom_scalars_layout", "layout_as_dict", "write_layout"]
