-- wrk's script for the bench (`bench/wrk.py`): replays a file of ready-made HTTP requests, in
-- order and round again, and prints one JSON line of figures when the run is done.
--
--     wrk -t1 -c64 -d10s --latency -s bench/wrk_replay.lua http://host:port -- FILE
--
-- FILE holds each request whole (request line, headers, body), preceded by its length in
-- bytes and a newline. Signing and formatting happen before the run, so wrk sends bytes only.

local requests = {}
local index = 0

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local data = file:read("*a")
  file:close()
  local position = 1
  while position <= #data do
    local newline = data:find("\n", position, true)
    local length = tonumber(data:sub(position, newline - 1))
    requests[#requests + 1] = data:sub(newline + 1, newline + length)
    position = newline + length + 1
  end
  -- wrk asks a thread for one request it never sends before the run starts: that one takes
  -- the list's last, so the first sent is the list's first.
  index = #requests - 1
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
