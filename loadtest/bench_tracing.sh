#!/usr/bin/env bash
# Tracing on vs off, through ../shared/peers/bench/vs_peer.sh (issue 9: with tracing on the
# ratios stay within 2 % of tracing off). Runs the same shape ROUNDS times each way, interleaved
# (off, on, off, on, ...), the bridge exporting to loadtest.otlp_sink when on, and prints each
# run's project and peer p95 TTFT ratios, CPU per 1,000 chunks, and the spans the sink received.
# Run from the project root with the venv active; the shape knobs of vs_peer.sh pass through
# (USERS RATE DURATION CHUNK_MS ...).
set -u
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
PYTHON=${PYTHON:-python}
port=$("$PYTHON" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
out=$(mktemp -d)
"$PYTHON" -m loadtest.otlp_sink --port "$port" >"$out/sink.json" 2>"$out/sink.log" & sink=$!
trap 'kill $sink 2>/dev/null' EXIT
traced="env OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$port $PYTHON -m bridge --host 127.0.0.1 --port {port}"
plain="$PYTHON -m bridge --host 127.0.0.1 --port {port}"
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    cmd=$plain; [ "$mode" = on ] && cmd=$traced
    BRIDGE_CMD=$cmd OUT_DIR="$out/$mode-$round" bash ../shared/peers/bench/vs_peer.sh >"$out/$mode-$round.txt" 2>&1
    echo "== tracing $mode, round $round"
    grep -E "ratio|CPU|per 1,000|p95" "$out/$mode-$round.txt" | tail -6
  done
done
kill $sink; wait $sink 2>/dev/null
echo "== spans received by the sink: $(cat "$out/sink.json")"
echo "files in $out"
