-- Per-request latency histograms for the gateway, measured inside HAProxy, and their Prometheus
-- exposition. Owns mmanager_gateway_request_duration_seconds{service, replica, code, le}; invariant:
-- every response that a frontend with the rules below sends (the servers' and HAProxy's own: 503 no
-- server, 429, 401) is observed exactly once, into the series of its (service, replica, status class).
--
-- HAProxy configuration (2.6); the start rule is the frontend's first http-request rule:
--
--   global
--       lua-load /path/to/latency.lua
--   frontend gateway
--       http-request set-var(txn.mm_t0) date(0,us)
--       http-after-response set-var-fmt(txn.mm_obs) "%[date(0,us),sub(txn.mm_t0)] %[status,div(100)] %b %s %[var(txn.mm_service)]"
--       http-after-response set-var(txn.mm_obs) var(txn.mm_obs),lua.mm_latency_observe
--   backend <each service>
--       http-request set-var(txn.mm_service) str(<owner>/<name>)
--   frontend metrics
--       http-request use-service lua.mm_latency_metrics if { path /metrics/latency }
--
-- Hooks. The start is a native set-var of the poller's clock in microseconds, so the request side runs
-- no Lua. The observation runs in http-after-response, the only rule set 2.6 evaluates on every
-- response, HAProxy's own included (http-response sees the servers' only). 2.6 allows no Lua action
-- there, so a native rule writes the observation as one string (elapsed microseconds, status class,
-- backend, server, service) and a Lua converter records it: a converter is called with that string
-- alone, where a Lua action or sample fetch is handed a new transaction object each time, which costs
-- more than all the rest of the observation. The converter's answer means nothing: the second set-var
-- merely overwrites the string with it. A response made before the start rule ran has no txn.mm_t0,
-- an empty elapsed time, and is not observed.
--
-- Labels: service is txn.mm_service, else the backend's name (the frontend's own, for a response
-- made before a backend was chosen); replica is the server's name, "" when no server answered; code
-- is the status class, "1xx".."5xx".
--
-- Threads: loaded with lua-load, one Lua state shared by every thread under HAProxy's Lua lock. With
-- lua-load-per-thread each thread would count into tables of its own and the exposition, served by
-- one thread, would report that thread's requests only: wrong counts whenever nbthread > 1. The lock
-- is held for two substrings, a table lookup and a few additions per response, so the threads rarely
-- wait on it.
--
-- Memory: one series (20 numbers and its labels) per (service, replica, code) seen, and one cache
-- entry per distinct observation key. A replica that is gone leaves its series until a scrape finds it
-- unchanged for IDLE_DROP seconds (an hour, or MMANAGER_GATEWAY_SERIES_IDLE in HAProxy's environment)
-- and drops it; a later request starts it again from zero, which Prometheus reads as a counter reset.
-- A reload starts a new process, hence new counters, as it does for HAProxy's own exporter.

local METRIC = "mmanager_gateway_request_duration_seconds"
-- Model inference: from a cached answer in a millisecond to a long generation in a minute.
local BUCKETS = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
local NB = #BUCKETS
-- Seconds a series may stay unchanged before a scrape drops it (the environment's, for the tests).
local IDLE_DROP = tonumber(os.getenv("MMANAGER_GATEWAY_SERIES_IDLE") or "") or 3600
local CLASSES = {["1"] = "1xx", ["2"] = "2xx", ["3"] = "3xx", ["4"] = "4xx", ["5"] = "5xx"}

local BOUND_US, LE = {}, {}
for i, bound in ipairs(BUCKETS) do
    BOUND_US[i] = math.floor(bound * 1000000 + 0.5)
    LE[i] = string.format("%g", bound)
end
LE[NB + 1] = "+Inf"

-- A series: [1..NB+1] = observations per bucket (not cumulative), sum_us, count, and for the sweep
-- the count the last scrape saw and when it last changed.
local by_labels = {} -- 'service="…",replica="…",code="…"' -> series
local by_key = {}    -- the observation string after its elapsed time -> series (a cache of by_labels)

local function escape(value)
    return (value:gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub("\"", "\\\""))
end

-- The series of an observation key ("<class digit> <backend> <server> <service>"); nil for a status
-- class outside 1xx..5xx.
local function series_of(key)
    local digit, backend, server, service = key:match("^(%d) (%S+) (%S+) ?(.*)$")
    local code = CLASSES[digit]
    if code == nil then
        return nil
    end
    -- Empty (or "-" in a log line) for a variable that is not set; <NOSRV> when no server was chosen.
    if service == "" or service == "-" then
        service = backend
    end
    if server == "<NOSRV>" or server == "-" then
        server = ""
    end
    local labels = 'service="' .. escape(service) .. '",replica="' .. escape(server) .. '",code="' .. code .. '"'
    local s = by_labels[labels]
    if s == nil then
        s = {sum_us = 0, count = 0, scraped = 0, changed = core.now().sec, labels = labels}
        for i = 1, NB + 1 do
            s[i] = 0
        end
        by_labels[labels] = s
    end
    by_key[key] = s
    return s
end

local function observe(value)
    local space = value:find(" ", 1, true)
    if space == nil then
        return nil
    end
    -- Empty: no start recorded for this request.
    local us = tonumber(value:sub(1, space - 1))
    if us == nil then
        return nil
    end
    local key = value:sub(space + 1)
    local s = by_key[key] or series_of(key)
    if s == nil then
        return nil
    end
    if us < 0 then
        us = 0
    end
    local i = 1
    while i <= NB and us > BOUND_US[i] do
        i = i + 1
    end
    s[i] = s[i] + 1
    s.sum_us = s.sum_us + us
    s.count = s.count + 1
    return nil
end

-- Forgets the series unchanged for IDLE_DROP seconds, and the keys that led to them.
local function sweep(now)
    local dropped = false
    for labels, s in pairs(by_labels) do
        if s.count ~= s.scraped then
            s.scraped, s.changed = s.count, now
        elseif now - s.changed > IDLE_DROP then
            by_labels[labels] = nil
            dropped = true
        end
    end
    if dropped then
        for key, s in pairs(by_key) do
            if by_labels[s.labels] ~= s then
                by_key[key] = nil
            end
        end
    end
end

local function exposition()
    sweep(core.now().sec)
    local out = {
        "# HELP " .. METRIC .. " Time from a request's arrival at the gateway to its response's headers, "
            .. "per service, replica and status class.",
        "# TYPE " .. METRIC .. " histogram",
    }
    local names = {}
    for labels in pairs(by_labels) do
        names[#names + 1] = labels
    end
    table.sort(names)
    for _, labels in ipairs(names) do
        local s = by_labels[labels]
        local cumulative = 0
        for i = 1, NB + 1 do
            cumulative = cumulative + s[i]
            out[#out + 1] = METRIC .. "_bucket{" .. labels .. ',le="' .. LE[i] .. '"} ' .. cumulative
        end
        out[#out + 1] = METRIC .. "_sum{" .. labels .. "} " .. string.format("%.6f", s.sum_us / 1000000)
        out[#out + 1] = METRIC .. "_count{" .. labels .. "} " .. s.count
    end
    out[#out + 1] = ""
    return table.concat(out, "\n")
end

local function metrics(applet)
    local body = exposition()
    applet:set_status(200)
    applet:add_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end

core.register_converters("mm_latency_observe", observe)
core.register_service("mm_latency_metrics", "http", metrics)
