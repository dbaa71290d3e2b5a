"""``BundleAPI``: the LitServe API of ``python -m pipelines.serve`` (run in each inference worker).

Per request it picks the domain adapter of the request's form and decodes the request into arrays
(:meth:`BundleAPI.decode_request`); per batch it groups the decoded requests by array names and
shapes and runs one :meth:`RequestAdapter.infer` per group (:meth:`BundleAPI.predict`), appends the
answered items to the request log, and encodes each answer with the headers of the model that made
it (:meth:`BundleAPI.encode_response`). Refused requests travel through the batch as
:class:`Rejected` values, never as exceptions. The command line, the server and its drain are in
:mod:`pipelines.serve`.
"""

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from fastapi.responses import JSONResponse

from pipelines import serving_metrics
from pipelines.bundle_runtime import Bundle
from pipelines.request_log import RequestLog, item_features, item_outputs
from pipelines.request_log import now as log_time
from pipelines.serving_registry import Loaded, ModelSlot
from pipelines.serving_server import PREDICT_PATH, model_identity
from pipelines.serving_requests import RequestAdapter, load_adapters, reject

# the records keep the serving command's logger name (log filters and handlers configured for it still apply)
logger = logging.getLogger("pipelines.serve")

API_PATH = PREDICT_PATH
#: infer outputs that are not answers: the model inputs an adapter prepared in infer (logged as features), a per-row refusal
LOGGED_INPUT, REFUSAL = "input.", "refusal"


@dataclass
class Decoded:
    """A request turned into arrays (``rows`` samples: model inputs and context) and the adapter that answers it."""

    adapter: RequestAdapter
    arrays: dict[str, np.ndarray]
    rows: int
    model: Loaded


@dataclass
class Rejected:
    """A request refused before or during inference: answered with ``status_code`` and ``detail``."""

    status_code: int
    detail: str
    model: Loaded | None = None


@dataclass
class Answered:
    """Model outputs (and request context) for one request's rows."""

    adapter: RequestAdapter
    outputs: dict[str, np.ndarray]
    model: Loaded


def log_to_stderr(process: str, level: str) -> None:
    """This module's log records to stderr, marked with the process's role and id."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s - {process}[%(process)d] - %(name)s - %(levelname)s - %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def non_finite_output(item: Decoded, outputs: dict[str, np.ndarray], model: Loaded) -> str | None:
    """The refusal of a request whose finite inputs gave a NaN or infinite model output, or ``None``.

    Such an output is no result (JSON would carry it as ``null``, and a ``null`` score reads as "not an alert"):
    the inputs lie so far outside what the model was trained on that its arithmetic overflowed. Any bundle, any form.
    Rows an adapter refused itself (``refusal``) carry placeholder outputs and are not checked here."""
    refused = outputs.get(REFUSAL)
    for name in model.bundle.metadata.get("outputs", []):
        values = np.asarray(outputs.get(name["name"], ()))
        if values.dtype.kind != "f" or np.isfinite(values).all():
            continue
        if refused is not None and refused[0] is not None:
            return None
        index = [int(i) for i in np.argwhere(~np.isfinite(values))[0]]
        value = float(values[tuple(index)])
        generic = item.adapter.name == "generic"  # one sample: its fields are the inputs, the batch axis is not shown
        fields = [f"inputs.{n}" for n in model.bundle.inputs if n in item.arrays] if generic else [item.adapter.name]
        where = index[1:] if generic else index
        return (f"{', '.join(fields)}: the values overflowed the model: its output {name['name']!r} is "
                f"{'NaN' if np.isnan(value) else value}{f' at {where}' if where else ''}, not a number; "
                "send values nearer the range of the training data")  # fmt: skip
    return None


class BundleAPI(ls.LitAPI):
    """LitServe API over one bundle: per-request decoding, batched inference, per-request answers.

    Refused requests travel through the batch as :class:`Rejected` values rather than exceptions,
    because LitServe fails every request of a batch when one of them raises.
    """

    def __init__(
        self, bundle_path: str | Path | None = None, max_batch_size: int = 16, batch_timeout: float = 0.01, log_level: str = "info",
        max_items: int = 1000, model_name: str | None = None, model_version: str | None = None, follow: str | Path | None = None,
        request_log: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.bundle_path = str(bundle_path) if bundle_path is not None else None
        self.follow = str(follow) if follow is not None else None  # a bundle cache whose current.json names the model to serve
        self.log_level = log_level
        self.max_items = max_items
        self.model_name, self.model_version = model_name, model_version
        self.request_log_options = request_log  # RequestLog's arguments; None: no log

    def setup(self, device: str) -> None:
        """Load the bundle and the domain's request adapters (in the inference worker, a fresh process).

        Following a registry alias, a thread loads each newly published bundle and swaps it in (:class:`ModelSlot`).
        """
        log_to_stderr("inference-worker", self.log_level)
        # Ctrl+C reaches every process of the terminal's group: this worker must outlive the drain, and
        # the server stops it (SIGTERM) once the requests in flight are answered.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.request_log = RequestLog(**self.request_log_options) if self.request_log_options else None
        if self.follow is not None:
            self.slot: Any = ModelSlot(self._load, Path(self.follow))
        else:
            self.slot = type("Fixed", (), {"current": self._load(self.bundle_path, None)})()

    def _load(self, bundle_path: str, identity: dict[str, str] | None) -> Loaded:
        bundle = Bundle(bundle_path)
        adapters = load_adapters(bundle.metadata)
        loaded = Loaded(bundle, adapters, identity or model_identity(bundle.metadata, self.model_name, self.model_version), bundle_path)
        serving_metrics.set_model_info(loaded)
        logger.info("loaded %s bundle %s (%s); request forms: %s", bundle.metadata["format"], bundle_path, loaded.identity["version"], ", ".join(a.name for a in adapters))
        return loaded

    @staticmethod
    def _forms(model: Loaded) -> str:
        return "; ".join(f"{a.name}: {a.example}" for a in model.adapters)

    # The annotation is evaluated (no ``from __future__ import annotations`` in this module): LitServe
    # gives it to FastAPI, which then answers a body that is not a JSON object with a 422 by itself.
    def decode_request(self, request: dict[str, Any]) -> Decoded | Rejected:
        """Pick the adapter for this request's form and turn it into model inputs (or a refusal); the model serving now predicts it."""
        model = self.slot.current
        try:
            if not request:
                reject("body", f"empty request; expected one of the forms {self._forms(model)}")
            adapter = next((a for a in model.adapters if a.accepts(request)), None)
            if adapter is None:
                reject(", ".join(sorted(map(str, request))), f"no request form has these fields; expected one of {self._forms(model)}")
            self._check_items(adapter, adapter.count_items(request))
            arrays = adapter.decode(request)
            rows = {int(a.shape[0]) if a.ndim else 0 for a in arrays.values()}
            missing = set(model.bundle.inputs) - set(arrays) if adapter.shares_model_calls else set()
            if missing or len(rows) != 1 or 0 in rows:
                raise RuntimeError(f"adapter {adapter.name!r} returned arrays {sorted(arrays)} with batch sizes {sorted(rows)}; inputs missing: {sorted(missing)}")
            count = rows.pop()
            self._check_items(adapter, count)
            serving_metrics.metrics().items.observe(count)
            return Decoded(adapter, arrays, count, model)
        except HTTPException as error:
            return Rejected(error.status_code, str(error.detail), model)
        except Exception:
            logger.exception("decoding a request failed")
            return Rejected(500, "internal error while decoding the request", model)

    def _check_items(self, adapter: RequestAdapter, count: int | None) -> None:
        """Refuse (413) a request of more than ``--max_items`` items: one huge request must not starve the others."""
        if count is not None and count > self.max_items:
            reject(adapter.name, f"{count} items in one request; this server takes at most {self.max_items} per request "
                   f"(--max_items {self.max_items}): send them in several requests", status_code=413)  # fmt: skip

    def predict(self, x: Any) -> Any:
        """Run the decoded requests in groups of equal array names and shapes (one :meth:`RequestAdapter.infer` per group).

        Requests of adapters that override ``infer`` are grouped per adapter; the others may share a group.
        Requests decoded by different models (a hot reload during the batch) never share a group.
        """
        items = x if isinstance(x, list) else [x]
        serving_metrics.metrics().batch_size.observe(len(items))
        results: list[Decoded | Rejected | Answered] = list(items)
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            if isinstance(item, Decoded):
                owner = None if item.adapter.shares_model_calls else id(item.adapter)
                key = (id(item.model), owner, tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in item.arrays.items())))
                groups.setdefault(key, []).append(index)
        for indices in groups.values():
            for i, result in zip(indices, self._run_group([items[i] for i in indices])):
                results[i] = result
        if self.request_log is not None:
            self._log_requests(items, results)
        logger.debug(
            "batch of %d request(s): %d answered, %d refused, %d sub-batch(es)",
            len(items), sum(isinstance(r, Answered) for r in results), sum(isinstance(r, Rejected) for r in results), len(groups),
        )  # fmt: skip
        return results if isinstance(x, list) else results[0]

    def _log_requests(self, items: list, results: list) -> None:
        """Append the answered items to the request log (a ``--request_log_sample`` share of the requests); never fails the batch."""
        try:
            stamp, records = log_time(), []
            for item, result in zip(items, results):
                refused = result.outputs.get(REFUSAL) if isinstance(result, Answered) else None
                if isinstance(result, Answered) and (refused is None or refused[0] is None) and self.request_log.wanted():
                    identity, reference = result.model.identity, result.model.bundle.metadata.get("reference_statistics")
                    inputs = {n: a for n, a in item.arrays.items() if n in result.model.bundle.inputs}
                    # an adapter that prepares its model inputs in infer (finance rows) hands them back as "input.NAME"
                    inputs.update({n.removeprefix(LOGGED_INPUT): a for n, a in result.outputs.items() if n.startswith(LOGGED_INPUT)})
                    outputs = {n: a for n, a in result.outputs.items() if not n.startswith(LOGGED_INPUT) and n != REFUSAL}
                    for i in range(item.rows):
                        records.append({"time": stamp, "model": identity["name"], "version": identity["version"], "form": item.adapter.name,
                                        "features": item_features(inputs, i, reference), "outputs": item_outputs(outputs, i)})  # fmt: skip
            self.request_log.append(records)
        except Exception:  # noqa: BLE001 - the answers matter more than their log
            logger.exception("writing the request log failed")

    def _run_group(self, group: list[Decoded]) -> list[Answered | Rejected]:
        """One :meth:`RequestAdapter.infer` call on a group's concatenated arrays, split back into per-request answers; when it
        fails for a group of several, each request is run alone, so only the one at fault is refused."""
        adapter, model = group[0].adapter, group[0].model
        total = sum(item.rows for item in group)
        try:
            batch = {name: np.concatenate([item.arrays[name] for item in group]) for name in group[0].arrays}
            outputs = adapter.infer(batch, model.bundle.run)
            if any(np.ndim(o) == 0 or len(o) != total for o in outputs.values()):
                raise RuntimeError(f"adapter {adapter.name!r}: infer returned {({n: np.shape(o) for n, o in outputs.items()})} for {total} rows")
        except Exception as error:
            if len(group) > 1:  # one request's refusal or failure must not fail the others batched with it: each alone
                return [answer for item in group for answer in self._run_group([item])]
            if isinstance(error, HTTPException):
                return [Rejected(error.status_code, str(error.detail), model)]
            if isinstance(error, ValueError):  # the bundle refused the inputs
                return [Rejected(422, str(error), model)]
            logger.exception("inference failed")
            return [Rejected(500, "internal error during inference", model)]
        answers: list[Answered | Rejected] = []
        start = 0
        for item in group:
            share = {n: o[start : start + item.rows] for n, o in outputs.items()}
            overflow = non_finite_output(item, share, model)
            answers.append(Answered(item.adapter, share, model) if overflow is None else Rejected(422, overflow, model))
            start += item.rows
        return answers

    def encode_response(self, output: Answered | Rejected) -> Any:
        """The adapter's JSON answer, or ``{"detail": ...}`` with the refusal's status code; headers name the model that made it."""
        if isinstance(output, Answered):
            try:
                return JSONResponse(content=output.adapter.encode(output.outputs), headers=output.model.headers)
            except HTTPException as error:  # a request refused by its adapter's batch step (e.g. a value that does not parse)
                output = Rejected(error.status_code, str(error.detail), output.model)
            except Exception:
                logger.exception("encoding an answer failed")
                output = Rejected(500, "internal error while encoding the answer", output.model)
        headers = output.model.headers if output.model is not None else None
        return JSONResponse(status_code=output.status_code, content={"detail": output.detail}, headers=headers)
