-- chronolake timeline: every version current at {known_at}, over all valid times.
SELECT {columns}, valid_from, valid_to, system_from, {sentinel} AS system_to
FROM {table}
WHERE row_kind IN ('open', 'closed')
  AND system_from <= {known_at}{key_filter}
GROUP BY {columns}, valid_from, valid_to, system_from
HAVING min(system_to) > {known_at}
ORDER BY {keys}, valid_from, system_from
