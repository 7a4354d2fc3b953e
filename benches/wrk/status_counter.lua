-- Optional per-status-code counts (BENCH_STATUS=1), printed after wrk's own summary as
-- "status <code>: <count>" lines. Defining response() makes wrk parse every response,
-- so this stays off by default.
if os.getenv("BENCH_STATUS") == "1" then
  local threads = {}

  function setup(thread)
    table.insert(threads, thread)
  end

  function init(args)
    statuses = {}
  end

  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end

  function done(summary, latency, requests)
    local total = {}
    for _, thread in ipairs(threads) do
      local counts = thread:get("statuses")
      if counts then
        for code, n in pairs(counts) do
          total[code] = (total[code] or 0) + n
        end
      end
    end
    for code, n in pairs(total) do
      io.write(string.format("status %s: %d\n", tostring(code), n))
    end
  end
end
