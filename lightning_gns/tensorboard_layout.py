"""A TensorBoard custom-scalars layout that groups the ``gns/`` charts.

TensorBoard's "Custom Scalars" dashboard draws several tags on one chart. The layout below puts
``B_simple`` next to the batch actually used per optimizer step (the comparison the noise scale is for),
the two unbiased estimates on another chart, and the batch sizes, accumulation and skipped steps on
their own. Tags are regular expressions matched from the start of the tag (``re.match``); the ``$``
anchors keep ``gns/b_simple`` from also drawing ``gns/b_simple_sequences`` and the like.
"""

from __future__ import annotations

from typing import Any

from tensorboard.plugins.custom_scalar import layout_pb2

CATEGORY = "gradient noise scale"
LAYER_CATEGORY = "gradient noise scale per layer"

# Chart title -> tag regexes. Tags nobody logged are simply not drawn, so optional scalars (the adaptive
# batch's, per_example's coverage) can be listed unconditionally.
CHARTS: dict[str, list[str]] = {
    "B_simple and the effective batch": [
        r"gns/b_simple$",
        r"gns/effective_batch_size$",
        r"gns/b_big$",
        r"gns/kaplan_b_crit_tokens$",
    ],
    "|G|^2 and tr(Sigma) estimates (log scale helps)": [
        r"gns/grad_sq_norm$",
        r"gns/trace_cov$",
    ],
    "forecasts for the batch in use: S/S_min, E/E_min, statistical efficiency": [
        r"gns/steps_over_min$",
        r"gns/examples_over_min$",
        r"gns/statistical_efficiency$",
    ],
    "batch sizes": [
        r"gns/b_small$",
        r"gns/b_big$",
        r"gns/effective_batch_size$",
    ],
    "accumulation and learning-rate factor": [
        r"gns/accumulation$",
        r"gns/lr_factor$",
    ],
    "skipped steps and coverage": [
        r"gns/skipped_steps$",
        r"gns/covered_fraction$",
    ],
}
LAYER_CHARTS: dict[str, list[str]] = {"B_simple per layer": [r"gns/layer/.*/b_simple$"]}


def gns_custom_scalars_layout() -> layout_pb2.Layout:
    """The custom-scalars layout proto for the ``gns/`` scalars.

    Two categories: the whole-model charts (open) and the per-layer noise scales (collapsed, since they
    exist only with ``per_layer=True``).

    Example:
        >>> layout = gns_custom_scalars_layout()
        >>> [chart.title for chart in layout.category[0].chart][:2]
        ['B_simple and the effective batch', '|G|^2 and tr(Sigma) estimates (log scale helps)']
    """
    return layout_pb2.Layout(
        category=[
            _category(CATEGORY, CHARTS, closed=False),
            _category(LAYER_CATEGORY, LAYER_CHARTS, closed=True),
        ]
    )


def _category(title: str, charts: dict[str, list[str]], closed: bool) -> layout_pb2.Category:
    return layout_pb2.Category(
        title=title,
        closed=closed,
        chart=[
            layout_pb2.Chart(title=chart, multiline=layout_pb2.MultilineChartContent(tag=tags))
            for chart, tags in charts.items()
        ],
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


def write_layout(logger: Any) -> bool:
    """Write :func:`gns_custom_scalars_layout` into a TensorBoardLogger's event file.

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
    experiment.add_custom_scalars(layout_as_dict(gns_custom_scalars_layout()))
    return True


__all__ = ["gns_custom_scalars_layout", "layout_as_dict", "write_layout"]
