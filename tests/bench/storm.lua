-- wrk script for a boot storm: MACHINES distinct machines, each fetching the entry script
-- and then its decision, on a new connection each time (as iPXE does). Every thread stops
-- once it has sent its share, so the run ends when all machines have booted.
--   ENTRY     path of the entry script      (/boot.ipxe, or /boot.php for the PHP script)
--   DECISION  path of the decision          (/ipxe, or /ipxe.php)
--   MACHINES  number of machines            (10000)
--   FIRST     number of the first machine   (0; rounds use different machines, so
--             every round's machines are new to the server, as in a real storm)
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_usec; } timeval;
  int gettimeofday(timeval *tv, void *tz);
]]
local function now_us()
  local tv = ffi.new("timeval")
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000000 + tonumber(tv.tv_usec)
end

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  entry = os.getenv("ENTRY") or "/boot.ipxe"
  decision = os.getenv("DECISION") or "/ipxe"
  machines = tonumber(os.getenv("MACHINES") or "10000")
  first_machine = tonumber(os.getenv("FIRST") or "0")
  count = tonumber(os.getenv("THREADS") or "2")
  sent = 0
  answered = 0
  errors = 0
  first_us = 0
  last_us = 0
  -- this thread's machines: id, id + count, id + 2*count, …
  share = 0
  for m = id, machines - 1, count do share = share + 1 end
end

local function mac(index)
  return string.format("02-00-00-%02x-%02x-%02x", math.floor(index / 65536) % 256, math.floor(index / 256) % 256, index % 256)
end

-- each machine its own address, as DHCP gives them
local function address(index)
  return string.format("10.%d.%d.%d", math.floor(index / 65536) % 256, math.floor(index / 256) % 256, index % 256)
end

function request()
  if first_us == 0 then first_us = now_us() end
  local step = sent
  sent = sent + 1
  local machine = first_machine + id + count * math.floor(step / 2)
  local headers = { ["Connection"] = "close" }
  if step % 2 == 0 then
    return wrk.format("GET", entry, headers)
  end
  local query = "?mac=" .. mac(machine) .. "&uuid=&serial_hex=&product_hex=&manufacturer_hex=&asset_hex=&hostname_hex=&ip="
    .. address(machine) .. "&ip6=&platform=pcbios&buildarch=i386"
  return wrk.format("GET", decision .. query, headers)
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then errors = errors + 1 end
  if answered == share * 2 then
    last_us = now_us()
    wrk.thread:stop()  -- wrk itself still runs for its full -d; the storm's time is ours
  end
end

function done(summary, latency, requests)
  local failed = 0
  local total = 0
  local first = nil
  local last = 0
  local unfinished = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("errors")
    total = total + thread:get("answered")
    local started = thread:get("first_us")
    if first == nil or started < first then first = started end
    local finished = thread:get("last_us")
    if finished == 0 then unfinished = unfinished + 1 end
    if finished > last then last = finished end
  end
  local e = summary.errors
  io.write(string.format("STORM answered=%d non200=%d socket_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d unfinished_threads=%d elapsed_us=%d p50_us=%d p99_us=%d max_us=%d\n",
    total, failed, e.connect + e.read + e.write + e.timeout, e.connect, e.read, e.write, e.timeout,
    unfinished, last - first, latency:percentile(50), latency:percentile(99), latency.max))
end
