-- paddler.lua for Envoy: slot-aware routing through paddler-agent's endpoint picker.
--
-- Per request: drop any client-supplied routing header, refuse /slots and admin endpoints
-- (unless the route's metadata allows them), then ask the agent's picker where to go:
--   200 -> set x-paddler-endpoint; the cluster's override_host policy routes there;
--   503 with x-paddler-verdict -> answer the client with the agent's JSON (buffer full or timeout);
--   anything else (agent down) -> no header: the cluster falls back to least_request.
-- When the response has streamed to its end, the lease is released so the slot is reused at once.
--
-- Settings come from the route's metadata (filter_metadata "envoy.filters.http.lua"):
--   picker_timeout_ms, expose_slots, expose_admin, skip_picker and the 403 bodies
--   (slots_forbidden_body, admin_forbidden_body). paddler-gen envoy writes them.
-- Envoy config: http_filters: - name: envoy.filters.http.lua
--                                typed_config: {default_source_code: {filename: .../paddler.lua}}

local ENDPOINT_HEADER = "x-paddler-endpoint"
local VERDICT_HEADER = "x-paddler-verdict"
local AGENT_CLUSTER = "paddler_agent"

-- The path llama.cpp will see: query dropped, %XX decoded, repeated slashes merged.
local function canonical_path(path)
  local bare = string.match(path or "/", "^[^?]*")
  bare = string.gsub(bare, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end)
  bare = string.gsub(bare, "/+", "/")
  return bare
end

local function forbidden_body(path, method, metadata)
  local canonical = canonical_path(path)
  if not metadata:get("expose_slots") and (canonical == "/slots" or string.sub(canonical, 1, 7) == "/slots/") then
    return metadata:get("slots_forbidden_body")
  end
  if not metadata:get("expose_admin") then
    if canonical == "/metrics" then
      return metadata:get("admin_forbidden_body")
    end
    if method == "POST" and (canonical == "/props" or canonical == "/lora-adapters") then
      return metadata:get("admin_forbidden_body")
    end
  end
  return nil
end

local function agent_headers(path)
  return { [":method"] = "POST", [":path"] = path, [":authority"] = "paddler-agent", ["content-length"] = "0" }
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  headers:remove(ENDPOINT_HEADER)
  local metadata = request_handle:metadata()
  if metadata:get("skip_picker") then
    return
  end
  local body = forbidden_body(headers:get(":path"), headers:get(":method"), metadata)
  if body ~= nil then
    request_handle:respond({ [":status"] = "403", ["content-type"] = "application/json" }, body)
    return
  end

  local timeout_ms = tonumber(metadata:get("picker_timeout_ms")) or 11000
  local reply_headers, reply_body = request_handle:httpCall(AGENT_CLUSTER, agent_headers("/api/v1/picker/acquire"),
                                                            "", timeout_ms)
  local status = reply_headers[":status"]
  if status == "200" and reply_headers[ENDPOINT_HEADER] ~= nil then
    -- Header handles do not survive the yield inside httpCall: fetch them again.
    request_handle:headers():add(ENDPOINT_HEADER, reply_headers[ENDPOINT_HEADER])
    request_handle:streamInfo():dynamicMetadata():set("paddler", "lease", reply_headers["x-paddler-lease"])
  elseif status == "503" and reply_headers[VERDICT_HEADER] ~= nil then
    request_handle:respond({ [":status"] = "503", ["content-type"] = "application/json",
                             ["retry-after"] = reply_headers["retry-after"] or "1" }, reply_body)
  else
    request_handle:logWarn("paddler-agent picker unavailable (status " .. tostring(status) ..
                           "): falling back to least_request")
  end
end

function envoy_on_response(response_handle)
  local paddler = response_handle:streamInfo():dynamicMetadata():get("paddler")
  if paddler == nil or paddler["lease"] == nil then
    return
  end
  -- Iterating passes each chunk on unbuffered; the loop ends when the (streamed) response does.
  for _ in response_handle:bodyChunks() do
  end
  response_handle:httpCall(AGENT_CLUSTER, agent_headers("/api/v1/picker/release/" .. paddler["lease"]), "", 1000, true)
end
