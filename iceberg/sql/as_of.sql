-- chronolake as_of: per key, the version true at {valid_at} as known at {known_at}.
-- A version's rows (its open twin, and its closed twin once superseded) share
-- (key, valid_from, system_from) and payload; it is current at known_at when none was closed by then.
SELECT {columns}, valid_from, valid_to, system_from, {sentinel} AS system_to
FROM {table}
WHERE row_kind IN ('open', 'closed')
  AND system_from <= {known_at}
  AND valid_from <= {valid_at} AND valid_to > {valid_at}{key_filter}
GROUP BY {columns}, valid_from, valid_to, system_from
HAVING min(system_to) > {known_at}
ORDER BY {keys}, valid_from, system_from
