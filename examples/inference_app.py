"""Example inference app: serves the model modelward activated on loopback HTTP. What is
security-relevant is in ``modelward.agent.app``: it loads only the model the trust record names
active (its bytes checked against the record's fingerprint), reloads when it changes (each
second, or on SIGHUP), and writes the queue depth the agent's idle gate reads.

  MODEL_DIR=/var/lib/modelward/current BUSY_FILE=/run/inference/busy python3 inference_app.py
  curl -d '{"input": [[0, 1, 2, 3, 4, 5, 6, 7]]}' http://127.0.0.1:8470/  # output, model, sha256
"""

import json
import logging
import os
import signal
import threading

import numpy as np
import onnxruntime as ort

from modelward.agent.app import BoundedHTTPServer, BusySignal, JsonHandler, ModelWatcher

BUSY = BusySignal(os.environ.get("BUSY_FILE", ""))
MODEL = ModelWatcher(os.environ.get("MODEL_DIR", "/var/lib/modelward/current"),
                     lambda m: ort.InferenceSession(m.data, providers=["CPUExecutionProvider"]),
                     BUSY)  # (a session made from the verified bytes, never from the path)


class Handler(JsonHandler):
    def do_GET(self) -> None:  # noqa: N802
        m = MODEL.active
        self.reply(200, m.describe()) if m else self.reply(503, {"error": "no verified model"})

    def do_POST(self) -> None:  # noqa: N802
        if (body := self.body()) is None:
            return None
        BUSY.add(+1)  # in the queue from now on (for the server's answer_seconds at most)
        try:
            if (m := MODEL.active) is None:  # one model per request, even if a reload swaps
                return self.reply(503, {"error": "no verified model"})
            try:
                x = np.asarray(json.loads(body)["input"], dtype=np.float32)
                y = m.runtime.run(None, {m.runtime.get_inputs()[0].name: x})[0]
            except Exception as e:  # noqa: BLE001 - bad JSON, or input the model refuses
                return self.reply(400, {"error": str(e)})
            if y.size > 1 << 15:  # (a bounded answer)
                return self.reply(500, {"error": f"an output of {y.size} values"})
            return self.reply(200, {"output": y.tolist(), **m.describe()})
        finally:
            BUSY.add(-1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="inference: %(message)s")
    BUSY.add(0)  # (not busy; the file exists)
    MODEL.poll()
    server = BoundedHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8470"))), Handler)
    signal.signal(signal.SIGHUP, lambda *_: MODEL.request_reload())  # ExecReload=kill -HUP
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=MODEL.watch, daemon=True).start()
    print(f"serving on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
    BUSY.remove()
