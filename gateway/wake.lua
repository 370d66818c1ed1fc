-- Wake on request: a request to a service with no usable replica asks the hub to wake it
-- (POST /api/gateway/wake/{service id}) and, when the hub answers that it is waking it (202: the
-- service was idle) or that its new copy is on its way (202 with "hold": seconds, a failover), is held
-- until a replica of its backend is usable, for HOLD seconds (or that hold, if less) at most;
-- then it goes on (to the replica, or to the backend's 503). Any other answer (200: not idle, an
-- error, no hub) lets the request go on at once, and for a second no request of that service asks
-- again, so a service that is down does not turn every request into a call to the hub.
--
-- HAProxy configuration (2.6), the backend's rule before its 503 rule:
--   global
--       lua-load /path/to/wake.lua
--   backend <each service>
--       http-request lua.mm_wake <service id> if { nbsrv eq 0 } !{ stopping }
--
-- The hub's URL and key come from HAProxy's environment (MMANAGER_HUB_URL, MMANAGER_API_KEY: the agent
-- starts HAProxy with them), never from the configuration file. A replica added through the runtime API
-- shows in the same worker, so the held request sees it.

local HUB = os.getenv("MMANAGER_HUB_URL")
local KEY = os.getenv("MMANAGER_API_KEY")
local HOLD = tonumber(os.getenv("MMANAGER_GATEWAY_WAKE_HOLD") or "") or 60
local POLL_MS = 50
local QUIET = 1

-- Service id -> when the hub last said it is not waking it.
local not_waking = {}

local function wake(service_id)
    if HUB == nil or KEY == nil then
        return false
    end
    local client = core.httpclient()
    local ok, answer = pcall(client.post, client, {
        url = HUB .. "/api/gateway/wake/" .. service_id,
        headers = {["Authorization"] = {"Bearer " .. KEY}, ["Content-Length"] = {"0"}},
        body = "",
    })
    if not ok or answer == nil or answer.status ~= 202 then
        return nil
    end
    -- A failover's answer says how long its new copy is worth waiting for; an idle service's does not.
    local hold = tonumber(string.match(answer.body or "", '"hold"%s*:%s*([%d.]+)') or "")
    if hold == nil or hold > HOLD then
        return HOLD
    end
    return hold
end

-- Service id -> until when requests are held for it: the requests that come meanwhile wait for the same
-- copy without asking the hub again.
local holding = {}

-- Ask the hub (unless a hold for the service is already running), and return until when to wait; nil: not.
local function hold_until(service_id, now)
    local deadline = holding[service_id]
    if deadline ~= nil and now < deadline then
        return deadline
    end
    local last = not_waking[service_id]
    if last ~= nil and now - last < QUIET then
        return nil
    end
    local hold = wake(service_id)
    if hold == nil then
        not_waking[service_id] = now
        return nil
    end
    not_waking[service_id] = nil
    holding[service_id] = now + hold
    return now + hold
end

core.register_action("mm_wake", {"http-req"}, function(txn, service_id)
    local started = core.now().sec
    local deadline = hold_until(service_id, started)
    -- A hold that ends with no replica asks again: the service may have changed meanwhile (a request that
    -- came while it was being stopped as idle is held as for a running one, then wakes it). Never longer
    -- than HOLD in all.
    while deadline ~= nil do
        -- nbsrv, as the 503 rule reads it: the backend's servers as they are now, runtime additions included.
        while core.now().sec < deadline do
            if (tonumber(txn.f:nbsrv()) or 0) > 0 then
                return
            end
            core.msleep(POLL_MS)
        end
        local now = core.now().sec
        if now - started >= HOLD then
            return
        end
        deadline = hold_until(service_id, now)
    end
end, 1)
