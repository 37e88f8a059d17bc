-- paddler.lua: the Envoy side of llama.cpp-aware balancing (Envoy 1.40, LuaJIT = Lua 5.1).
--
-- Slot-aware routing through paddler-agent's endpoint picker. Per request: drop any
-- client-supplied routing header, refuse /slots and admin endpoints (unless the route's
-- metadata allows them), then ask the agent's picker where to go:
--   200 -> set x-paddler-endpoint; the cluster's override_host policy routes there;
--   503 with x-paddler-verdict -> answer the client with the agent's JSON (buffer full or timeout);
--   403 or 421 (the agent refused the filter's picker_token or name) -> no header, an error:
--       least_request, as when the agent is down (a config slip must not become an outage);
--   anything else (agent down) -> no header, a warning: the cluster falls back to least_request.
-- When the response has streamed to its end, the lease is released so the slot is reused at once.
--
-- Settings come from the route's metadata (filter_metadata "envoy.filters.http.lua");
-- paddler-gen envoy writes them:
--   picker_token (sent to the agent in x-paddler-picker-token),
--   picker_timeout_ms, slots_forbidden_body, admin_forbidden_body   required: a route without
--       one is answered 500 "misconfigured" and logged, never guessed;
--   expose_slots, expose_admin   optional, default false (refuse);
--   skip_picker                  optional: true on routes that are not llama.cpp (/health).
--
-- Envoy config lines (paddler-gen envoy writes them):
--   http_filters:
--   - name: envoy.filters.http.lua
--     typed_config:
--       "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
--       default_source_code: {filename: /etc/envoy/paddler/paddler.lua}
--   clusters: paddler_agent (the agent's management address) and llama (override_host on
--   the x-paddler-endpoint header, least_request fallback).
--
-- Everything is local; the file returns its table of pure helpers (for the unit tests, run on
-- a plain LuaJIT) and defines the two globals Envoy looks up: envoy_on_request, envoy_on_response.

local paddler = {}

local ENDPOINT_HEADER = "x-paddler-endpoint"
local VERDICT_HEADER = "x-paddler-verdict"
local LEASE_HEADER = "x-paddler-lease"
local AGENT_CLUSTER = "paddler_agent"
local AGENT_AUTHORITY = "paddler-agent"  -- a host name the agent serves (agentcheck/management.py)
local PICKER_TOKEN_HEADER = "x-paddler-picker-token"
local RELEASE_TIMEOUT_MS = 1000
local REQUIRED_SETTINGS = { "picker_timeout_ms", "slots_forbidden_body", "admin_forbidden_body", "picker_token" }

-- The path llama.cpp will see: query dropped, %XX decoded, repeated slashes merged.
function paddler.canonical_path(path)
  local bare = string.match(path or "/", "^[^?]*")
  bare = string.gsub(bare, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end)
  bare = string.gsub(bare, "/+", "/")
  return bare
end

-- The route's settings as a table, or nil and the reason (naming the key) when one is missing.
-- metadata is anything with get(self, key): Envoy's route metadata handle.
function paddler.read_settings(metadata)
  local settings = {}
  for _, key in ipairs(REQUIRED_SETTINGS) do
    local value = metadata:get(key)
    if value == nil then
      return nil, "route metadata lacks " .. key
    end
    settings[key] = value
  end
  settings.picker_timeout_ms = tonumber(settings.picker_timeout_ms)
  if settings.picker_timeout_ms == nil or settings.picker_timeout_ms <= 0 then
    return nil, "route metadata's picker_timeout_ms is not a positive number"
  end
  settings.expose_slots = metadata:get("expose_slots") == true
  settings.expose_admin = metadata:get("expose_admin") == true
  return settings
end

-- The 500 body for a route paddler-gen did not write; same shape as llama.cpp's errors.
-- reason comes from read_settings: fixed text and key names, nothing to escape.
function paddler.misconfigured_body(reason)
  return '{"error":{"code":500,"type":"misconfigured","message":"paddler.lua: ' .. reason .. '"}}'
end

-- The 403 body when this request must not reach llama.cpp, else nil.
function paddler.forbidden_body(path, method, settings)
  local canonical = paddler.canonical_path(path)
  if not settings.expose_slots and (canonical == "/slots" or string.sub(canonical, 1, 7) == "/slots/") then
    return settings.slots_forbidden_body
  end
  if not settings.expose_admin then
    if canonical == "/metrics" then
      return settings.admin_forbidden_body
    end
    if method == "POST" and (canonical == "/props" or canonical == "/lora-adapters") then
      return settings.admin_forbidden_body
    end
  end
  return nil
end

-- The headers of a call to the agent's picker; token is the route's picker_token.
function paddler.agent_headers(path, token)
  return { [":method"] = "POST", [":path"] = path, [":authority"] = AGENT_AUTHORITY, ["content-length"] = "0",
           [PICKER_TOKEN_HEADER] = token }
end

function paddler.on_request(request_handle)
  local headers = request_handle:headers()
  headers:remove(ENDPOINT_HEADER)
  local metadata = request_handle:metadata()
  if metadata:get("skip_picker") then
    return
  end
  local settings, problem = paddler.read_settings(metadata)
  if settings == nil then
    request_handle:logErr("paddler.lua: " .. problem)
    request_handle:respond({ [":status"] = "500", ["content-type"] = "application/json" },
                           paddler.misconfigured_body(problem))
    return
  end
  local body = paddler.forbidden_body(headers:get(":path"), headers:get(":method"), settings)
  if body ~= nil then
    request_handle:respond({ [":status"] = "403", ["content-type"] = "application/json" }, body)
    return
  end

  local acquire = paddler.agent_headers("/api/v1/picker/acquire", settings.picker_token)
  local reply_headers, reply_body = request_handle:httpCall(AGENT_CLUSTER, acquire, "", settings.picker_timeout_ms)
  local status = reply_headers[":status"]
  if status == "200" and reply_headers[ENDPOINT_HEADER] ~= nil then
    -- Header handles do not survive the yield inside httpCall: fetch them again.
    request_handle:headers():add(ENDPOINT_HEADER, reply_headers[ENDPOINT_HEADER])
    if reply_headers[LEASE_HEADER] ~= nil then
      request_handle:streamInfo():dynamicMetadata():set("paddler", "lease", reply_headers[LEASE_HEADER])
    end
  elseif status == "503" and reply_headers[VERDICT_HEADER] ~= nil then
    request_handle:respond({ [":status"] = "503", ["content-type"] = "application/json",
                             ["retry-after"] = reply_headers["retry-after"] or "1" }, reply_body)
  elseif status == "403" or status == "421" then
    request_handle:logErr("paddler-agent refused the filter's call (status " .. status .. "): paddler-gen envoy " ..
                          "and paddler-agent must read the same agent.picker_token_env; falling back to least_request")
  else
    request_handle:logWarn("paddler-agent picker unavailable (status " .. tostring(status) ..
                           "): falling back to least_request")
  end
end

function paddler.on_response(response_handle)
  local state = response_handle:streamInfo():dynamicMetadata():get("paddler")
  if state == nil or state["lease"] == nil then
    return
  end
  -- Iterating passes each chunk on unbuffered; the loop ends when the (streamed) response does.
  for _ in response_handle:bodyChunks() do
  end
  -- The token from the route's metadata, like on the request: the secret stays out of dynamic metadata.
  local release = paddler.agent_headers("/api/v1/picker/release/" .. state["lease"],
                                        response_handle:metadata():get("picker_token"))
  response_handle:httpCall(AGENT_CLUSTER, release, "", RELEASE_TIMEOUT_MS, true)
end

-- Envoy finds its entry points as globals.
envoy_on_request = paddler.on_request
envoy_on_response = paddler.on_response

return paddler
