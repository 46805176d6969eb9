"""CrowNest Python code-context runner: one persistent interpreter.

Started by crownest-agent inside the sandbox, one process per Code Context.
Reads run requests as JSON lines from fd 3 and writes Jupyter-shaped events
as JSON lines to fd 4:

  request:  {"id": 1, "nonce": "…", "code": "value = 42"}
            {"setup": {"cwd": "/workspace", "env": {...}}}  -> setup_done | setup_error
  events:   {"type": "ready", "implementation": "ipython 8.5.0"}
            {"id": 1, "type": "stream", "name": "stdout", "text": "..."}
            {"id": 1, "type": "display_data", "data": {mime: value}, "metadata": {}}
            {"id": 1, "type": "execute_result", "execution_count": 3, "data": {...}}
            {"id": 1, "type": "error", "ename": "...", "evalue": "...", "traceback": [...]}
            {"id": 1, "type": "done", "execution_count": 3, "status": "ok" | "error",
             "nonce": "<the request's nonce>"}

Binary MIME values (image/png, image/jpeg) are base64, as in Jupyter.
Uses IPython's InteractiveShell when installed (rich reprs, display(),
matplotlib figures, DataFrames, top-level await), else a plain exec-based
runner with the same events. SIGINT interrupts the running cell
(KeyboardInterrupt), and the context keeps its state.
"""

import ast
import base64
import io
import json
import math
import numbers
import os
import sys
import traceback

# The request and event pipes come in as fds 3 and 4; nothing the code
# starts may inherit them (a subprocess could otherwise spoof events or end
# a later run), so they are close-on-exec from here on.
os.set_inheritable(3, False)
os.set_inheritable(4, False)
EVENTS = os.fdopen(4, "w", buffering=1, encoding="utf-8")
REQUESTS = os.fdopen(3, "r", encoding="utf-8")
FIGURE_MIME = "application/vnd.crownest.figure+json"
DATAFRAME_MIME = "application/vnd.crownest.dataframe+json"
MAX_ROWS = 1000

current_id = None


def emit(event):
    if current_id is not None and "id" not in event:
        event["id"] = current_id
    EVENTS.write(json.dumps(event, default=str) + "\n")
    EVENTS.flush()


class EventStream(io.TextIOBase):
    """sys.stdout/sys.stderr replacement that streams text as events."""

    def __init__(self, name):
        self.name = name

    def writable(self):
        return True

    def write(self, text):
        if text:
            emit({"type": "stream", "name": self.name, "text": str(text)})
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


def jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def bundle(data):
    return {mime: jsonable(value) for mime, value in data.items()}


def finite(value):
    """A float for JSON: NaN and infinities (not valid JSON) become None."""
    number = float(value)
    return number if math.isfinite(number) else None


def figure_description(fig):
    """A JSON description of a matplotlib figure for the chart formatter."""
    axes_list = []
    for ax in fig.get_axes():
        axes = {
            "title": ax.get_title(),
            "xlabel": ax.get_xlabel(),
            "ylabel": ax.get_ylabel(),
            "xscale": ax.get_xscale(),
            "yscale": ax.get_yscale(),
            "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
            "lines": [],
            "scatters": [],
            "bars": [],
            "pies": [],
            "boxes": [],
        }
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_child") or label.startswith("_line"):
                label = ""
            xs = [finite(x) if isinstance(x, numbers.Real) else str(x) for x in line.get_xdata()]
            ys = [finite(y) for y in line.get_ydata()]
            axes["lines"].append({"label": label, "xs": xs, "ys": ys})
        for collection in ax.collections:
            offsets = getattr(collection, "get_offsets", None)
            if offsets is None:
                continue
            points = [[finite(x), finite(y)] for x, y in offsets()]
            if points:
                axes["scatters"].append({"label": collection.get_label(), "points": points})
        for container in ax.containers:
            patches = getattr(container, "patches", None)
            if not patches:
                continue
            heights = [finite(p.get_height()) for p in patches]
            xs = [float(p.get_x() + p.get_width() / 2) for p in patches]
            axes["bars"].append(
                {"label": container.get_label() or "", "heights": heights, "xs": xs}
            )
        try:
            from matplotlib.patches import Wedge

            wedges = [p for p in ax.patches if isinstance(p, Wedge)]
        except Exception:  # noqa: BLE001
            wedges = []
        if wedges:
            labels = [t.get_text() for t in ax.texts]
            total = sum(abs(w.theta2 - w.theta1) for w in wedges) or 360.0
            axes["pies"].append(
                {
                    "labels": labels[: len(wedges)],
                    "angles": [abs(w.theta2 - w.theta1) for w in wedges],
                    "fractions": [abs(w.theta2 - w.theta1) / total for w in wedges],
                    "radius": float(wedges[0].r),
                }
            )
        axes_list.append(axes)
    return {"title": fig._suptitle.get_text() if fig._suptitle else "", "axes": axes_list}


def flush_figures():
    """Emits each open matplotlib figure as PNG plus a description, then closes it."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    plt = sys.modules["matplotlib.pyplot"]
    for number in plt.get_fignums():
        fig = plt.figure(number)
        png = io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight")
        # Two outputs, as E2B gives: the rendered PNG, and the figure's data
        # for the formatter's chart.
        image = {
            "image/png": base64.b64encode(png.getvalue()).decode("ascii"),
            "text/plain": repr(fig),
        }
        emit({"type": "display_data", "data": image, "metadata": {}})
        try:
            description = figure_description(fig)
        except Exception:  # noqa: BLE001 - a description is best effort
            description = None
        if description is not None:
            chart = {FIGURE_MIME: description, "text/plain": repr(fig)}
            emit({"type": "display_data", "data": chart, "metadata": {}})
    plt.close("all")


def dataframe_json(df):
    head = df.head(MAX_ROWS)
    return {
        "columns": [str(c) for c in head.columns],
        "index": [str(i) for i in head.index],
        "rows": json.loads(head.to_json(orient="values", date_format="iso", default_handler=str)),
        "dtypes": [str(t) for t in head.dtypes],
        "totalRows": int(len(df)),
        "truncated": bool(len(df) > MAX_ROWS),
    }


def make_ipython():
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.formatters import BaseFormatter
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Unicode
    from traitlets.config import Config

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            emit(
                {
                    "type": "execute_result",
                    "execution_count": self.shell.execution_count,
                    "data": bundle(format_dict),
                    "metadata": md_dict or {},
                }
            )

        def finish_displayhook(self):
            pass

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False):
            emit({"type": "display_data", "data": bundle(data), "metadata": metadata or {}})

        def clear_output(self, wait=False):
            pass

    class DataFrameFormatter(BaseFormatter):
        format_type = Unicode(DATAFRAME_MIME)
        print_method = "_crownest_dataframe_"
        _return_type = (dict,)

    # No history database: it would be a SQLite file in the user's
    # /workspace/.ipython, written by a thread after every run (about half a
    # millisecond of a `1+1` run). In[], Out[] and _ stay, kept in memory.
    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(
        config=config, displayhook_class=Hook, display_pub_class=Publisher
    )
    shell.displayhook = Hook(shell=shell)
    shell.display_pub = Publisher(shell=shell)
    shell.run_line_magic("colors", "NoColor")
    formatters = shell.display_formatter.formatters
    formatters[DATAFRAME_MIME] = DataFrameFormatter(parent=shell.display_formatter)
    formatters[DATAFRAME_MIME].for_type_by_name("pandas.core.frame", "DataFrame", dataframe_json)
    formatters["image/png"].enabled = True

    def show_traceback(etype, evalue, stb):
        emit(
            {
                "type": "error",
                "ename": getattr(etype, "__name__", str(etype)),
                "evalue": str(evalue),
                "traceback": list(stb),
            }
        )

    shell._showtraceback = show_traceback
    import IPython

    return shell, "ipython " + IPython.__version__


def run_ipython(shell, code):
    result = shell.run_cell(code, store_history=True)
    flush_figures()
    ok = result.error_before_exec is None and result.error_in_exec is None
    return shell.execution_count - 1, ok


class PlainRunner:
    """Fallback without IPython: exec with last-expression results."""

    def __init__(self):
        self.namespace = {"__name__": "__main__"}
        self.count = 0

    def run(self, code):
        self.count += 1
        try:
            tree = ast.parse(code, mode="exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<cell>", "exec"), self.namespace)
            if last is not None:
                value = eval(compile(last, "<cell>", "eval"), self.namespace)
                if value is not None:
                    emit(
                        {
                            "type": "execute_result",
                            "execution_count": self.count,
                            "data": {"text/plain": repr(value)},
                            "metadata": {},
                        }
                    )
            flush_figures()
            return self.count, True
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            emit(
                {
                    "type": "error",
                    "ename": type(e).__name__,
                    "evalue": str(e),
                    "traceback": traceback.format_exception(type(e), e, e.__traceback__),
                }
            )
            return self.count, False


def main():
    global current_id
    os.environ.setdefault("MPLBACKEND", "Agg")
    # IPython's profile directory goes to /tmp, not the user's /workspace.
    os.environ.setdefault("IPYTHONDIR", "/tmp/.ipython")
    sys.stdout = EventStream("stdout")
    sys.stderr = EventStream("stderr")
    try:
        shell, implementation = make_ipython()
        run = lambda code: run_ipython(shell, code)  # noqa: E731
    except ImportError:
        plain = PlainRunner()
        implementation = "python " + sys.version.split()[0]
        run = plain.run
    emit({"type": "ready", "implementation": implementation})
    for line in REQUESTS:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        if "setup" in request:
            setup = request["setup"] or {}
            try:
                os.chdir(setup.get("cwd") or os.getcwd())
                os.environ.update({str(k): str(v) for k, v in (setup.get("env") or {}).items()})
                emit({"type": "setup_done"})
            except OSError as e:
                emit({"type": "setup_error", "message": str(e)})
            continue
        current_id = request.get("id")
        # The run's end is matched on this nonce, which the code never sees
        # (it is taken out of the request before the code runs).
        nonce = str(request.pop("nonce", ""))
        code = request.get("code", "")
        del request, line
        try:
            count, ok = run(code)
        except KeyboardInterrupt:
            emit({"type": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": []})
            count, ok = None, False
        emit({"type": "done", "execution_count": count, "status": "ok" if ok else "error", "nonce": nonce})
        del nonce
        current_id = None


if __name__ == "__main__":
    main()
