-- Per-request latency histograms for the gateway, measured inside HAProxy, and their Prometheus
-- exposition. Owns mmanager_gateway_request_duration_seconds{service, replica, code, le}; invariant:
-- every response a frontend that uses it sends (the servers' and HAProxy's own: 503 no server, 429,
-- 401) is observed exactly once, into the series of (service, replica, status class).
--
-- HAProxy configuration (2.6), the frontend's rules first:
--
--   global
--       lua-load /path/to/latency.lua
--   frontend gateway
--       http-request set-var(txn.mm_t0) date(0,us)              # first http-request rule
--       http-after-response set-var(txn.mm_obs) lua.mm_latency_observe
--   backend <each service>
--       http-request set-var(txn.mm_service) str(<owner>/<name>)
--   frontend metrics
--       http-request use-service lua.mm_latency_metrics if { path /metrics/latency }
--
-- Hooks. The start is a native set-var of the poller's clock in microseconds (the clock core.now()
-- reads too), so the request side runs no Lua at all. The observation runs in http-after-response,
-- the only rule set 2.6 evaluates on every response, HAProxy's own included (http-response sees the
-- servers' only); 2.6 allows no Lua action there, so it is a Lua sample fetch called by set-var: it
-- records, returns nothing, and set-var then sets nothing. A response made before the start rule ran
-- (an error of the request parser) has no txn.mm_t0 and is not observed.
--
-- Labels: service is txn.mm_service, else the backend's name (the frontend's own, for a response
-- made before a backend was chosen); replica is the server's name, "" when no server answered; code
-- is the status class, "2xx".."5xx" ("1xx" for a lone interim answer).
--
-- Threads: loaded with lua-load, one Lua state shared by every thread under HAProxy's Lua lock. With
-- lua-load-per-thread each thread would count into tables of its own and the exposition, served by
-- one thread, would report only that thread's requests, so the counts would be wrong for nbthread > 1.
-- The lock is held for one table update per response (no allocation but core.now()'s table), short
-- against the rest of a request's work, so the threads rarely wait on it.
--
-- Memory: one series (17 numbers) per (service, replica, code) seen. A replica that is gone leaves
-- its series until it has been idle for IDLE_DROP seconds; the next scrape then drops it (a later
-- request starts it again from zero, which Prometheus reads as a counter reset). A reload starts a new
-- process, hence new counters, as it does for HAProxy's own exporter.

local METRIC = "mmanager_gateway_request_duration_seconds"
-- Model inference: from a cached answer in a millisecond to a long generation in a minute.
local BUCKETS = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
local NB = #BUCKETS
local IDLE_DROP = 3600
local CLASSES = {"1xx", "2xx", "3xx", "4xx", "5xx"}

local LE = {}
for i, bound in ipairs(BUCKETS) do
    LE[i] = string.format("%g", bound)
end
LE[NB + 1] = "+Inf"

-- series[service][replica][code] = {[1..NB+1] = observations per bucket (not cumulative),
--                                   sum = seconds, count = observations, touched = epoch seconds}
local series = {}

local function observe(txn)
    local t0 = txn:get_var("txn.mm_t0")
    if t0 == nil then
        return nil
    end
    local f = txn.f
    local code = CLASSES[(f:status() or 0) // 100]
    if code == nil then
        return nil
    end
    local now = core.now()
    local seconds = (now.sec * 1000000 + now.usec - t0) / 1000000
    if seconds < 0 then
        seconds = 0
    end
    local service = txn:get_var("txn.mm_service") or f:be_name() or ""
    local replica = f:srv_name() or ""

    local by_replica = series[service]
    if by_replica == nil then
        by_replica = {}
        series[service] = by_replica
    end
    local by_code = by_replica[replica]
    if by_code == nil then
        by_code = {}
        by_replica[replica] = by_code
    end
    local s = by_code[code]
    if s == nil then
        s = {sum = 0.0, count = 0, touched = 0}
        for i = 1, NB + 1 do
            s[i] = 0
        end
        by_code[code] = s
    end
    local i = 1
    while i <= NB and seconds > BUCKETS[i] do
        i = i + 1
    end
    s[i] = s[i] + 1
    s.sum = s.sum + seconds
    s.count = s.count + 1
    s.touched = now.sec
    return nil
end

local function escape(value)
    return (value:gsub("\\", "\\\\"):gsub("\n", "\\n"):gsub("\"", "\\\""))
end

-- The exposition, series sorted by their labels; drops the series idle for longer than IDLE_DROP.
local function exposition(now)
    local out = {
        "# HELP " .. METRIC .. " Time from a request's arrival at the gateway to its response's headers, "
            .. "per service, replica and status class.",
        "# TYPE " .. METRIC .. " histogram",
    }
    local services = {}
    for service, by_replica in pairs(series) do
        services[#services + 1] = service
    end
    table.sort(services)
    for _, service in ipairs(services) do
        local by_replica = series[service]
        local replicas = {}
        for replica in pairs(by_replica) do
            replicas[#replicas + 1] = replica
        end
        table.sort(replicas)
        for _, replica in ipairs(replicas) do
            local by_code = by_replica[replica]
            for _, code in ipairs(CLASSES) do
                local s = by_code[code]
                if s ~= nil and now - s.touched > IDLE_DROP then
                    by_code[code] = nil
                elseif s ~= nil then
                    local labels = 'service="' .. escape(service) .. '",replica="' .. escape(replica)
                        .. '",code="' .. code .. '"'
                    local cumulative = 0
                    for i = 1, NB + 1 do
                        cumulative = cumulative + s[i]
                        out[#out + 1] = METRIC .. "_bucket{" .. labels .. ',le="' .. LE[i] .. '"} ' .. cumulative
                    end
                    out[#out + 1] = METRIC .. "_sum{" .. labels .. "} " .. string.format("%.17g", s.sum)
                    out[#out + 1] = METRIC .. "_count{" .. labels .. "} " .. s.count
                end
            end
            if next(by_code) == nil then
                by_replica[replica] = nil
            end
        end
        if next(by_replica) == nil then
            series[service] = nil
        end
    end
    out[#out + 1] = ""
    return table.concat(out, "\n")
end

local function metrics(applet)
    local body = exposition(core.now().sec)
    applet:set_status(200)
    applet:add_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end

core.register_fetches("mm_latency_observe", observe)
core.register_service("mm_latency_metrics", "http", metrics)
