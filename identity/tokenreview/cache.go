package tokenreview

import (
	"container/list"
	"crypto/sha256"
	"time"

	"github.com/meshca/meshca/identity"
)

// tokenHash is the key reviews are cached and shared under: a SHA-256 of
// the token and its audiences (reviewKey), so that no token is kept once
// its review is done.
type tokenHash = [sha256.Size]byte

// cache holds accepted reviews until they expire, at most limit of them; the
// least recently used goes first when it is full. It is not safe for
// concurrent use.
type cache struct {
	limit int
	order *list.List // of *cacheEntry, most recently used first
	items map[tokenHash]*list.Element
}

type cacheEntry struct {
	key     tokenHash
	caller  identity.Caller
	expires time.Time
}

func newCache(limit int) *cache {
	return &cache{limit: limit, order: list.New(), items: make(map[tokenHash]*list.Element)}
}

// get returns the caller of an entry that has not expired at now.
func (c *cache) get(key tokenHash, now time.Time) (identity.Caller, bool) {
	el, ok := c.items[key]
	if !ok {
		return identity.Caller{}, false
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.order.Remove(el)
		delete(c.items, key)
		return identity.Caller{}, false
	}
	c.order.MoveToFront(el)
	return e.caller, true
}

// add stores caller under key until expires, evicting the least recently
// used entry when the cache is full.
func (c *cache) add(key tokenHash, caller identity.Caller, expires time.Time) {
	if c.limit <= 0 {
		return
	}
	if el, ok := c.items[key]; ok {
		e := el.Value.(*cacheEntry)
		e.caller, e.expires = caller, expires
		c.order.MoveToFront(el)
		return
	}
	c.items[key] = c.order.PushFront(&cacheEntry{key: key, caller: caller, expires: expires})
	if c.order.Len() > c.limit {
		oldest := c.order.Back()
		c.order.Remove(oldest)
		delete(c.items, oldest.Value.(*cacheEntry).key)
	}
}

func (c *cache) len() int { return c.order.Len() }
