-- A message row is updated twice on its way to final: the claim (a HOT
-- update: no indexed column changes) and the outcome. At fillfactor 70 a
-- page of messages had room for about two new row versions, not one per
-- row, so two claims in three left their page and were not HOT (33% of
-- updates HOT in a 90,000-message drain; 50% at fillfactor 50, every
-- claim). Postgres spent ~230 µs per delivered message at 70 and ~205 at
-- 50 (docs/performance.md). Pages written from now on keep half free.
ALTER TABLE messages SET (fillfactor = 50);
ALTER TABLE recipients SET (fillfactor = 50);
